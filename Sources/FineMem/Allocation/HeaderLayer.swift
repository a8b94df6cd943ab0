/// A layer that commits a block with one CAS on one header: the chunk layer (1-16 chunks
/// in a span header) and the section layer (1-16 spans in a section header). Each layer
/// says where its header is, which transitions claim and release a run, and how to
/// search; the protocol over them (`allocate(in:)`, `free(_:in:)`) is written once.
///
/// A block's `count` in a layer is its size in the header's units (chunks of a span,
/// spans of a section), as log2.
protocol HeaderLayer {
    associatedtype Header: LoggedHeader
    /// The header's unit, as log2 of chunks (0: chunks, 5: spans).
    static var unitChunkCountLog2: Int { get }
    /// The header that commits `block`.
    static func slot(of block: Block) -> HeaderSlot
    /// Where `block` starts inside its header, in units.
    static func offset(of block: Block) -> Int
    /// The first chunk of the run at `offset` of the header at `slot`.
    static func firstChunk(slot: HeaderSlot, offset: Int) -> Int
    static func claiming(_ header: Header, offset: Int, countLog2: Int, owner: OwnerID) -> Header?
    static func releasing(_ header: Header, offset: Int, countLog2: Int, owner: OwnerID) -> Header?
    /// Whether every unit of the run is marked allocated (`allocated`) or free.
    static func marks(_ header: Header, offset: Int, countLog2: Int, allocated: Bool) -> Bool
    /// Picks where to claim a run of `2^countLog2` units, from the cache; marks the chosen
    /// header busy.
    static func choose(countLog2: Int, cache: inout HeaderCache, link: MemoryNodeLink) -> HeaderChoice?
}

/// Blocks of 1-16 chunks inside one span, committed on the span header.
enum ChunkLayer: HeaderLayer {
    static let unitChunkCountLog2 = 0
    static func slot(of block: Block) -> HeaderSlot { .span(section: block.section, span: block.spanInSection) }
    static func offset(of block: Block) -> Int { block.chunkInSpan }
    static func firstChunk(slot: HeaderSlot, offset: Int) -> Int {
        guard case .span(let section, let span) = slot else { preconditionFailure("the chunk layer commits on span headers, not \(slot)") }
        return section * PoolGeometry.chunksPerSection + span * PoolGeometry.chunksPerSpan + offset
    }
    static func claiming(_ header: SpanHeader, offset: Int, countLog2: Int, owner: OwnerID) -> SpanHeader? {
        header.claiming(offset: offset, chunkCountLog2: countLog2, owner: owner)
    }
    static func releasing(_ header: SpanHeader, offset: Int, countLog2: Int, owner: OwnerID) -> SpanHeader? {
        header.releasing(offset: offset, chunkCountLog2: countLog2, owner: owner)
    }
    static func marks(_ header: SpanHeader, offset: Int, countLog2: Int, allocated: Bool) -> Bool {
        allocated ? header.marksAllocated(offset: offset, chunkCountLog2: countLog2) : header.marksFree(offset: offset, chunkCountLog2: countLog2)
    }
    static func choose(countLog2: Int, cache: inout HeaderCache, link: MemoryNodeLink) -> HeaderChoice? {
        chooseSpan(chunkCountLog2: countLog2, cache: &cache, link: link)
    }
}

/// Blocks of 1-16 whole spans inside one section, committed on the section header.
enum SectionLayer: HeaderLayer {
    static let unitChunkCountLog2 = 5
    static func slot(of block: Block) -> HeaderSlot { .section(block.section) }
    static func offset(of block: Block) -> Int { block.spanInSection }
    static func firstChunk(slot: HeaderSlot, offset: Int) -> Int {
        guard case .section(let section) = slot else { preconditionFailure("the section layer commits on section headers, not \(slot)") }
        return section * PoolGeometry.chunksPerSection + offset * PoolGeometry.chunksPerSpan
    }
    static func claiming(_ header: SectionHeader, offset: Int, countLog2: Int, owner: OwnerID) -> SectionHeader? {
        header.claiming(spanOffset: offset, spanCountLog2: countLog2, owner: owner)
    }
    static func releasing(_ header: SectionHeader, offset: Int, countLog2: Int, owner: OwnerID) -> SectionHeader? {
        header.releasing(spanOffset: offset, spanCountLog2: countLog2, owner: owner)
    }
    static func marks(_ header: SectionHeader, offset: Int, countLog2: Int, allocated: Bool) -> Bool {
        allocated ? header.marksWhole(spanOffset: offset, spanCountLog2: countLog2) : header.marksEmpty(spanOffset: offset, spanCountLog2: countLog2)
    }
    static func choose(countLog2: Int, cache: inout HeaderCache, link: MemoryNodeLink) -> HeaderChoice? {
        chooseSection(spanCountLog2: countLog2, cache: &cache, link: link)
    }
}

extension BlockAllocator {
    /// Allocates `2^chunkCountLog2` chunks on `link` in `layer`; nil when the node has no
    /// room. Each choice of the search gets one commit CAS; a lost one refreshes the cache
    /// from its answer and the search chooses again.
    func allocate<Layer: HeaderLayer>(
        in layer: Layer.Type, chunkCountLog2: Int, application: ApplicationID, on link: MemoryNodeLink, trace: inout OperationTrace
    ) async throws(AllocationError) -> Block? {
        let countLog2 = chunkCountLog2 - Layer.unitChunkCountLog2
        var refreshed = false
        var failures: [HeaderSlot: Int] = [:]
        var backoff = Backoff(configuration)
        while trace.attempts < configuration.operationAttemptsMax {
            switch link.cache.withLock({ Layer.choose(countLog2: countLog2, cache: &$0, link: link) }) {
            case nil:
                if refreshed { return nil }
                refreshed = true
                do { try await link.refresh(trace: &trace) } catch { throw .fabric(error) }
            case .wait:
                try await backoff.pause(runtime)
            case .readSpans(let section):
                do { try await link.readSpans(of: section, trace: &trace) } catch { throw .fabric(error) }
            case .open(let section, let span):
                defer { link.releaseBusy(.section(section)) }
                if let block = try await openSpan(section: section, span: span, chunkCountLog2: chunkCountLog2, application: application, on: link, trace: &trace) {
                    return block
                }
                trace.attempts += 1
            case .claim(let slot, let offset):
                defer { link.releaseBusy(slot) }
                let failed = failures[slot, default: 0]
                let outcome: UpdateOutcome<Layer.Header> = try await update(
                    slot, UpdatePolicy(attemptsMax: 1, log: .commitAfterFlush), on: link, trace: &trace
                ) { header in
                    Layer.claiming(header, offset: offset, countLog2: countLog2, owner: owner).map { markingContention($0, failures: failed) }
                }
                switch outcome {
                case .updated(let header):
                    let block = Block(memoryNode: link.memoryNode, firstChunk: Layer.firstChunk(slot: slot, offset: offset), chunkCountLog2: chunkCountLog2)
                    committed(header, in: layer, on: slot, block: block, allocated: true, application: application, link: link)
                    link.cache.withLock { $0.cursor = slot.section }
                    return block
                case .lost(let current):
                    failures[slot, default: 0] += 1
                    try await lost(toPendingLog: Layer.Header(rawValue: current)?.logPending ?? false, backoff: &backoff, trace: &trace)
                case .refused:
                    trace.attempts += 1
                }
            }
        }
        throw .retryLimitExceeded(attempts: trace.attempts)
    }

    /// Frees `block` of `layer`: one CAS on its header.
    func free<Layer: HeaderLayer>(
        _ block: Block, in layer: Layer.Type, application: ApplicationID, on link: MemoryNodeLink, trace: inout OperationTrace
    ) async throws(AllocationError) {
        let slot = Layer.slot(of: block)
        let offset = Layer.offset(of: block)
        let countLog2 = block.chunkCountLog2 - Layer.unitChunkCountLog2
        var backoff = Backoff(configuration)
        try await acquireBusy(slot, on: link)
        defer { link.releaseBusy(slot) }
        while trace.attempts < configuration.operationAttemptsMax {
            let outcome: UpdateOutcome<Layer.Header> = try await update(
                slot, UpdatePolicy(attemptsMax: 1, log: .commitAfterFlush, rereadOnRefusal: true), on: link, trace: &trace
            ) { Layer.releasing($0, offset: offset, countLog2: countLog2, owner: owner) }
            switch outcome {
            case .updated(let header):
                committed(header, in: layer, on: slot, block: block, allocated: false, application: application, link: link)
                return
            case .lost(let current):
                try await lost(toPendingLog: Layer.Header(rawValue: current)?.logPending ?? false, backoff: &backoff, trace: &trace)
            case .refused(let current):
                throw .corruptMetadata("\(slot) does not hold \(block): \(Layer.Header(rawValue: current).map { "\($0)" } ?? "invalid word")")
            }
        }
        throw .retryLimitExceeded(attempts: trace.attempts)
    }

    /// After a block operation's commit: checks its postcondition (the header's log is
    /// pending, names this node, and the block's run is marked as the operation left it),
    /// records the pending log, and starts the upkeep (flush; for a span, close or hint).
    func committed<Layer: HeaderLayer>(
        _ header: Layer.Header, in layer: Layer.Type, on slot: HeaderSlot, block: Block, allocated: Bool,
        application: ApplicationID, link: MemoryNodeLink
    ) {
        let countLog2 = block.chunkCountLog2 - Layer.unitChunkCountLog2
        precondition(Layer.marks(header, offset: Layer.offset(of: block), countLog2: countLog2, allocated: allocated),
                     "the commit on \(slot) does not mark \(block) \(allocated ? "allocated" : "free"): \(header)")
        link.logCommitted(header, on: slot, block: block, allocated: allocated, application: application, taken: false)
        startUpkeep(of: slot, on: link)
    }

    /// `link.update` on a header, with a fabric error as an allocation error.
    func update<Header: LoggedHeader>(
        _ slot: HeaderSlot, _ policy: UpdatePolicy, on link: MemoryNodeLink, alsoRead: [HeaderSlot] = [],
        trace: inout OperationTrace, _ transition: (Header) -> Header?
    ) async throws(AllocationError) -> UpdateOutcome<Header> {
        do { return try await link.update(.header(slot), policy, alsoRead: alsoRead, trace: &trace, transition) } catch { throw .fabric(error) }
    }

    /// `header` with its contention mark set or cleared after `failures` lost CASes.
    func markingContention<Header: LoggedHeader>(_ header: Header, failures: Int) -> Header {
        if failures >= configuration.contentionHigh, !header.contended { return header.with(contended: true) }
        if failures <= configuration.contentionLow, header.contended { return header.with(contended: false) }
        return header
    }
}
