import FineMem

/// Checks DESIGN.md's invariants on memory nodes by reading their words (never writing).
///
/// - Invariant 1: no two live blocks overlap (`admit` keeps a chunk map of the ledger).
/// - Invariant 3: the two header layers agree: a span with chunks in use is open and its
///   section entry is in chunk mode; a span whose section entry is empty or whole is not
///   open. Every block of the ledger is marked in the headers of its layer.
/// - At rest (`checkAtRest`, after every flush): no pending log, no span in the middle of
///   an open or close, no chunk-mode entry over a closed span, no intent record left,
///   every chunk in use belongs to a ledger block, every ledger block's full-log record
///   names its owner and size, and no record claims a block the ledger does not hold (no
///   leak).
package final class PoolInspector: @unchecked Sendable {
    /// One memory node's pool as the inspector reads it: through its simulated NIC, or
    /// with CPU loads of a verbs NIC's pool.
    private struct Pool {
        let id: NodeID
        let geometry: PoolGeometry
        let base: RemoteAddress
        let peek: (RemoteAddress) -> UInt64
    }

    private let pools: [Pool]
    private var holders: [NodeID: [Int: Block]] = [:]
    private var ledger: [Block: OwnerID] = [:]

    /// An inspector of every memory node of `cluster`.
    package init(cluster: EmbeddedCluster) {
        let simulated = zip(cluster.memoryNodes, cluster.nics).map { node, nic in
            Pool(id: node.id, geometry: node.geometry, base: nic.baseAddress, peek: nic.peekWord)
        }
        let verbs = zip(cluster.memoryNodes, cluster.verbsNICs).map { node, nic in
            Pool(id: node.id, geometry: node.geometry, base: nic.baseAddress, peek: nic.peekWord)
        }
        pools = simulated + verbs
    }

    /// Blocks the ledger holds now, with their owners, by memory node and first chunk: a
    /// defined order, so that a run that frees them in this order posts the same verbs
    /// whatever the process's hash seed (the ledger's own order depends on it).
    package var liveBlocks: [(block: Block, owner: OwnerID)] {
        ledger.map { (block: $0.key, owner: $0.value) }
            .sorted { ($0.block.memoryNode, $0.block.firstChunk) < ($1.block.memoryNode, $1.block.firstChunk) }
    }

    private func pool(_ id: NodeID) -> Pool { pools.first { $0.id == id }! }

    private func word(_ pool: Pool, _ offset: UInt64) -> UInt64 { pool.peek(pool.base + offset) }

    private func section(_ pool: Pool, _ section: Int) -> SectionHeader? {
        SectionHeader(rawValue: word(pool, pool.geometry.sectionHeaderOffset(section)))
    }
    private func span(_ pool: Pool, _ section: Int, _ span: Int) -> SpanHeader? {
        SpanHeader(rawValue: word(pool, pool.geometry.spanHeaderOffset(section: section, span: span)))
    }
    private func record(_ pool: Pool, chunk: Int) -> FullLogRecord? {
        FullLogRecord(rawValue: word(pool, pool.geometry.fullLogOffset(chunk: chunk)))
    }

    /// The section header `section` of memory node `node`; nil when the word is invalid.
    package func section(on node: NodeID, _ index: Int) -> SectionHeader? { section(pool(node), index) }
    /// The span header `span` of section `section` of memory node `node`.
    package func span(on node: NodeID, section: Int, span index: Int) -> SpanHeader? { span(pool(node), section, index) }
    /// The node-table slot of `owner` on memory node `node`.
    package func nodeSlot(on node: NodeID, owner: OwnerID) -> NodeSlot? {
        let pool = pool(node)
        return NodeSlot(rawValue: word(pool, pool.geometry.nodeSlotOffset(owner)))
    }
    /// The full-log record of `chunk` of memory node `node`.
    package func record(on node: NodeID, chunk: Int) -> FullLogRecord? { record(pool(node), chunk: chunk) }

    /// Adds a block just handed out; reports an overlap with a live block (invariant 1)
    /// and a block its headers do not mark as allocated.
    package func admit(_ block: Block, owner: OwnerID) -> [String] {
        var problems: [String] = []
        for chunk in block.chunks {
            if let other = holders[block.memoryNode]?[chunk] {
                problems.append("invariant 1: \(block) of \(owner) overlaps \(other) of \(ledger[other].map { "\($0)" } ?? "?")")
                break
            }
        }
        for chunk in block.chunks { holders[block.memoryNode, default: [:]][chunk] = block }
        ledger[block] = owner
        problems += marked(block)
        return problems
    }

    /// Removes a block its owner freed; reports a block the ledger did not hold.
    package func release(_ block: Block) -> [String] {
        guard ledger.removeValue(forKey: block) != nil else { return ["released \(block), which the ledger does not hold"] }
        for chunk in block.chunks { holders[block.memoryNode]?[chunk] = nil }
        return []
    }

    /// Whether the headers of `block`'s layer mark it allocated.
    package func marked(_ block: Block) -> [String] {
        let pool = pool(block.memoryNode)
        switch block.layer {
        case .chunk:
            let spanHeader = span(pool, block.section, block.spanInSection)
            guard let spanHeader, spanHeader.mode == .open, spanHeader.marksAllocated(SpanHeader.run(of: block)) else {
                return ["invariant 3: \(block) is not marked in its span header \(String(describing: spanHeader))"]
            }
            guard section(pool, block.section)?.state(ofSpan: block.spanInSection).isChunkMode == true else {
                return ["invariant 3: span of \(block) is not in chunk mode in its section"]
            }
        case .section:
            guard let header = section(pool, block.section), header.marksAllocated(SectionHeader.run(of: block)) else {
                return ["invariant 3: \(block) is not marked whole in its section header"]
            }
        case .multiSection:
            for index in block.sections where section(pool, index)?.isAllWhole != true {
                return ["invariant 3: section \(index) of \(block) is not held whole"]
            }
        }
        return []
    }

    /// The structural agreement of both header layers, on every memory node (invariant 3).
    package func checkStructure() -> [String] {
        var problems: [String] = []
        for pool in pools {
            for sectionIndex in 0..<pool.geometry.sectionCount {
                guard let sectionHeader = section(pool, sectionIndex) else {
                    problems.append("\(pool.id) section \(sectionIndex): invalid word")
                    continue
                }
                for spanIndex in 0..<PoolGeometry.spansPerSection {
                    guard let spanHeader = span(pool, sectionIndex, spanIndex) else {
                        problems.append("\(pool.id) span \(sectionIndex).\(spanIndex): invalid word")
                        continue
                    }
                    let state = sectionHeader.state(ofSpan: spanIndex)
                    if spanHeader.bitmap != 0, !(spanHeader.mode == .open && state.isChunkMode) {
                        problems.append("invariant 3: \(pool.id) span \(sectionIndex).\(spanIndex) has chunks in use (\(spanHeader.mode)) but its section says \(state)")
                    }
                    if !state.isChunkMode, spanHeader.mode == .open {
                        problems.append("invariant 3: \(pool.id) span \(sectionIndex).\(spanIndex) is open but its section says \(state)")
                    }
                }
            }
        }
        return problems
    }

    /// The checks that hold once every log is flushed (no operation in flight).
    package func checkAtRest() -> [String] {
        var problems = checkStructure()
        for pool in pools {
            let held = holders[pool.id] ?? [:]
            for sectionIndex in 0..<pool.geometry.sectionCount {
                guard let sectionHeader = section(pool, sectionIndex) else { continue }
                if sectionHeader.logPending { problems.append("\(pool.id) section \(sectionIndex): log still pending at rest") }
                for spanIndex in 0..<PoolGeometry.spansPerSection {
                    guard let spanHeader = span(pool, sectionIndex, spanIndex) else { continue }
                    if spanHeader.logPending { problems.append("\(pool.id) span \(sectionIndex).\(spanIndex): log still pending at rest") }
                    if spanHeader.mode == .opening || spanHeader.mode == .closing {
                        problems.append("\(pool.id) span \(sectionIndex).\(spanIndex): still \(spanHeader.mode) (by \(spanHeader.log.owner)) at rest")
                    }
                    if spanHeader.mode == .closed, sectionHeader.state(ofSpan: spanIndex).isChunkMode {
                        problems.append("leak: \(pool.id) span \(sectionIndex).\(spanIndex) is closed under a chunk-mode entry at rest")
                    }
                    let firstChunk = sectionIndex * PoolGeometry.chunksPerSection + spanIndex * PoolGeometry.chunksPerSpan
                    for chunk in 0..<PoolGeometry.chunksPerSpan where spanHeader.bitmap & (1 << UInt32(chunk)) != 0 && held[firstChunk + chunk] == nil {
                        problems.append("leak: \(pool.id) chunk \(firstChunk + chunk) is in use but no live block holds it")
                    }
                    if sectionHeader.state(ofSpan: spanIndex) == .whole, held[firstChunk] == nil {
                        problems.append("leak: \(pool.id) span \(sectionIndex).\(spanIndex) is held whole but no live block holds it")
                    }
                }
            }
            for slot in 0..<pool.geometry.computeNodeSlots * pool.geometry.intentSlotsPerNode {
                let word = word(pool, pool.geometry.intentTableOffset + 8 * UInt64(slot))
                if word != IntentRecord.none.rawValue {
                    problems.append("\(pool.id) intent slot \(slot) still holds \(IntentRecord(rawValue: word).map { "\($0)" } ?? "an invalid word") at rest")
                }
            }
            for chunk in 0..<pool.geometry.chunkCount {
                guard let record = record(pool, chunk: chunk) else {
                    problems.append("\(pool.id) record \(chunk): invalid")
                    continue
                }
                if let block = held[chunk], block.firstChunk == chunk {
                    if !record.isAllocated || record.owner != ledger[block] || record.chunkCountLog2 != block.chunkCountLog2 || record.layer != block.layer {
                        problems.append("full log: \(block) of \(ledger[block]!) has record \(record)")
                    }
                } else if record.isAllocated {
                    problems.append("full log: chunk \(chunk) of \(pool.id) records a block of \(record.owner) that nobody holds")
                }
            }
        }
        return problems
    }

    /// The room summary agrees with the section headers (`RoomSummary`): true at rest
    /// when no compute node died with a sync still to do.
    package func checkRoomSummary() -> [String] {
        pools.compactMap { pool in
            let geometry = pool.geometry
            let sections = (0..<geometry.sectionCount).map { word(pool, geometry.sectionHeaderOffset($0)) }
            let words = (0..<RoomSummary.wordCount(sections: geometry.sectionCount)).map { word(pool, geometry.roomSummaryOffset(word: $0)) }
            let tops = (0..<RoomSummary.topWordCount(sections: geometry.sectionCount)).map { word(pool, geometry.roomSummaryTopOffset(word: $0)) }
            return RoomSummary.staleSections(sections: sections, words: words, topWords: tops).map {
                "\(pool.id) room summary: the bits of sections \($0.lowerBound)..<\($0.upperBound) disagree with their headers at rest"
            }
        }
    }

    /// Invariant L5 at any instant: every section whose pending log is a multi-section
    /// operation of live node X (not one fenced and being recovered) is covered by an
    /// intent record of X (a claim or release in the
    /// middle names its node; the intent is cleared only after the logs are flushed, or
    /// after the rollback of a lost claim).
    package func checkIntents() -> [String] {
        var problems: [String] = []
        for pool in pools {
            let geometry = pool.geometry
            var covered: [OwnerID: [Range<Int>]] = [:]
            for owner in 0..<geometry.computeNodeSlots {
                for slot in 0..<geometry.intentSlotsPerNode {
                    let word = word(pool, geometry.intentOffset(owner: OwnerID(UInt16(owner)), slot: slot))
                    guard let intent = IntentRecord(rawValue: word), intent.isValid else { continue }
                    covered[intent.owner, default: []].append(intent.sections)
                }
            }
            for sectionIndex in 0..<geometry.sectionCount {
                guard let header = section(pool, sectionIndex), header.logPending, header.log.sizeCode == SectionHeader.multiSectionSizeCode else { continue }
                // Recovery commits in a fenced node's name without intents: it is the one
                // in the middle of the operation, and it runs again until the logs are gone.
                if let slot = NodeSlot(rawValue: word(pool, geometry.nodeSlotOffset(header.log.owner))), slot.state == .dead || slot.state == .recovering { continue }
                if !(covered[header.log.owner] ?? []).contains(where: { $0.contains(sectionIndex) }) {
                    problems.append("L5: \(pool.id) section \(sectionIndex) has a pending multi-section log of \(header.log.owner) that no intent of it covers")
                }
            }
        }
        return problems
    }

    /// Whether any memory node has room for a block of `2^chunkCountLog2` chunks, as its
    /// settled headers show it (pending logs counted as flushed): a free aligned run in an
    /// open span or an empty span (chunk layer), in a section (section layer), or an
    /// aligned run of empty sections.
    package func freeRunExists(chunkCountLog2: Int) -> Bool {
        for pool in pools {
            let sectionCount = pool.geometry.sectionCount
            switch Block.layer(chunkCountLog2: chunkCountLog2) {
            case .chunk:
                for sectionIndex in 0..<sectionCount {
                    guard let sectionHeader = section(pool, sectionIndex)?.settled else { continue }
                    for spanIndex in 0..<PoolGeometry.spansPerSection {
                        let state = sectionHeader.state(ofSpan: spanIndex)
                        if state == .empty { return true }
                        if state.isChunkMode, span(pool, sectionIndex, spanIndex)?.settled.firstFreeRun(countLog2: chunkCountLog2) != nil { return true }
                    }
                }
            case .section:
                for sectionIndex in 0..<sectionCount
                where section(pool, sectionIndex)?.settled.firstFreeRun(countLog2: chunkCountLog2 - SectionHeader.unitChunkCountLog2) != nil {
                    return true
                }
            case .multiSection:
                let count = 1 << (chunkCountLog2 - Block.sectionLayerCountLog2Max)
                for first in stride(from: 0, to: sectionCount - count + 1, by: count)
                where (first..<first + count).allSatisfy({ section(pool, $0)?.settled.isAllEmpty == true }) {
                    return true
                }
            }
        }
        return false
    }

    /// Whether every header is back to empty (after all blocks are freed).
    package func everyHeaderEmpty() -> [String] {
        var problems: [String] = []
        for pool in pools {
            for sectionIndex in 0..<pool.geometry.sectionCount {
                if let sectionHeader = section(pool, sectionIndex), !sectionHeader.isAllEmpty || sectionHeader.logPending {
                    problems.append("\(pool.id) section \(sectionIndex) is not empty: \(sectionHeader.spanStates)")
                }
                for spanIndex in 0..<PoolGeometry.spansPerSection {
                    if let spanHeader = span(pool, sectionIndex, spanIndex), spanHeader.mode != .closed || spanHeader.bitmap != 0 || spanHeader.logPending {
                        problems.append("\(pool.id) span \(sectionIndex).\(spanIndex) is not empty: \(spanHeader.mode) bitmap \(spanHeader.bitmap)")
                    }
                }
            }
        }
        return problems
    }
}
