/// Checks DESIGN.md's invariants on memory nodes by reading their words (never writing).
///
/// - Invariant 1: no two live blocks overlap (`admit` keeps a chunk map of the ledger).
/// - Invariant 3: the two header layers agree: a span with chunks in use is open and its
///   section entry is in chunk mode; a span whose section entry is empty or whole is not
///   open. Every block of the ledger is marked in the headers of its layer.
/// - At rest (`checkAtRest`, after every flush): no pending log, every chunk in use
///   belongs to a ledger block, every ledger block's full-log record names its owner and
///   size, and no record claims a block the ledger does not hold (no leak).
public final class PoolInspector: @unchecked Sendable {
    public let memoryNodes: [MemoryNode]
    private var holders: [NodeID: [Int: Block]] = [:]
    private var ledger: [Block: OwnerID] = [:]

    public init(memoryNodes: [MemoryNode]) {
        self.memoryNodes = memoryNodes
    }

    /// Blocks the ledger holds now.
    public var liveBlocks: [Block: OwnerID] { ledger }

    private func node(_ id: NodeID) -> MemoryNode { memoryNodes.first { $0.id == id }! }

    private func word(_ node: MemoryNode, _ offset: UInt64) -> UInt64 { node.nic.peekWord(node.nic.baseAddress + offset) }

    public func section(_ node: MemoryNode, _ s: Int) -> SectionHeader? { SectionHeader(rawValue: word(node, node.geometry.sectionHeaderOffset(s))) }
    public func span(_ node: MemoryNode, _ s: Int, _ p: Int) -> SpanHeader? { SpanHeader(rawValue: word(node, node.geometry.spanHeaderOffset(section: s, span: p))) }
    public func record(_ node: MemoryNode, chunk: Int) -> FullLogRecord? { FullLogRecord(rawValue: word(node, node.geometry.fullLogOffset(chunk: chunk))) }

    /// Adds a block just handed out; reports an overlap with a live block (invariant 1)
    /// and a block its headers do not mark as allocated.
    public func admit(_ block: Block, owner: OwnerID) -> [String] {
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
    public func release(_ block: Block) -> [String] {
        guard ledger.removeValue(forKey: block) != nil else { return ["released \(block), which the ledger does not hold"] }
        for chunk in block.chunks { holders[block.memoryNode]?[chunk] = nil }
        return []
    }

    /// Whether the headers of `block`'s layer mark it allocated.
    public func marked(_ block: Block) -> [String] {
        let node = node(block.memoryNode)
        let s = block.firstChunk / PoolGeometry.chunksPerSection
        switch block.layer {
        case .chunk:
            let p = block.firstChunk % PoolGeometry.chunksPerSection / PoolGeometry.chunksPerSpan
            let mask = SpanHeader.runMask(offset: block.firstChunk % 32, sizeLog2: block.sizeLog2)
            guard let span = span(node, s, p), span.mode == .open, span.bitmap & mask == mask else {
                return ["invariant 3: \(block) is not marked in its span header \(String(describing: span(node, s, p)))"]
            }
            guard section(node, s)?.state(ofSpan: p).isChunkMode == true else { return ["invariant 3: span of \(block) is not in chunk mode in its section"] }
        case .section:
            let first = block.firstChunk % PoolGeometry.chunksPerSection / PoolGeometry.chunksPerSpan
            guard let header = section(node, s), (first..<first + (1 << (block.sizeLog2 - 5))).allSatisfy({ header.state(ofSpan: $0) == .whole }) else {
                return ["invariant 3: \(block) is not marked whole in its section header"]
            }
        case .multiSection:
            for t in s..<s + (1 << (block.sizeLog2 - 9)) where section(node, t)?.isAllWhole != true {
                return ["invariant 3: section \(t) of \(block) is not held whole"]
            }
        }
        return []
    }

    /// The structural agreement of both header layers, on every memory node (invariant 3).
    public func checkStructure() -> [String] {
        var problems: [String] = []
        for node in memoryNodes {
            for s in 0..<node.geometry.sectionCount {
                guard let section = section(node, s) else { problems.append("\(node.id) section \(s): invalid word"); continue }
                for p in 0..<SectionHeader.spanCount {
                    guard let span = span(node, s, p) else { problems.append("\(node.id) span \(s).\(p): invalid word"); continue }
                    let state = section.state(ofSpan: p)
                    if span.bitmap != 0, !(span.mode == .open && state.isChunkMode) {
                        problems.append("invariant 3: \(node.id) span \(s).\(p) has chunks in use (\(span.mode)) but its section says \(state)")
                    }
                    if !state.isChunkMode, span.mode == .open {
                        problems.append("invariant 3: \(node.id) span \(s).\(p) is open but its section says \(state)")
                    }
                }
            }
        }
        return problems
    }

    /// The checks that hold once every log is flushed (no operation in flight).
    public func checkAtRest() -> [String] {
        var problems = checkStructure()
        for node in memoryNodes {
            let held = holders[node.id] ?? [:]
            for s in 0..<node.geometry.sectionCount {
                guard let section = section(node, s) else { continue }
                if section.logPending { problems.append("\(node.id) section \(s): log still pending at rest") }
                for p in 0..<SectionHeader.spanCount {
                    guard let span = span(node, s, p) else { continue }
                    if span.logPending { problems.append("\(node.id) span \(s).\(p): log still pending at rest") }
                    let base = s * PoolGeometry.chunksPerSection + p * PoolGeometry.chunksPerSpan
                    for c in 0..<32 where span.bitmap & (1 << UInt32(c)) != 0 && held[base + c] == nil {
                        problems.append("leak: \(node.id) chunk \(base + c) is in use but no live block holds it")
                    }
                    if section.state(ofSpan: p) == .whole, held[base] == nil {
                        problems.append("leak: \(node.id) span \(s).\(p) is held whole but no live block holds it")
                    }
                }
            }
            for chunk in 0..<node.geometry.chunkCount {
                guard let record = record(node, chunk: chunk) else { problems.append("\(node.id) record \(chunk): invalid"); continue }
                let block = held[chunk].flatMap { $0.firstChunk == chunk ? $0 : nil }
                if let block {
                    if !record.isAllocated || record.owner != ledger[block] || record.sizeLog2 != block.sizeLog2 || record.layer != block.layer {
                        problems.append("full log: \(block) of \(ledger[block]!) has record \(record)")
                    }
                } else if record.isAllocated {
                    problems.append("full log: chunk \(chunk) of \(node.id) records a block of \(record.owner) that nobody holds")
                }
            }
        }
        return problems
    }

    /// Whether every header is back to empty (after all blocks are freed).
    public func everyHeaderEmpty() -> [String] {
        var problems: [String] = []
        for node in memoryNodes {
            for s in 0..<node.geometry.sectionCount {
                if let section = section(node, s), !section.isAllEmpty || section.logPending {
                    problems.append("\(node.id) section \(s) is not empty: \(section.spanStates)")
                }
                for p in 0..<SectionHeader.spanCount {
                    if let span = span(node, s, p), span.mode != .closed || span.bitmap != 0 || span.logPending {
                        problems.append("\(node.id) span \(s).\(p) is not empty: \(span.mode) bitmap \(span.bitmap)")
                    }
                }
            }
        }
        return problems
    }
}
