/// FineMem's allocation protocol for one compute node, over one connection to each memory
/// node: a two-layer bitmap tree of section and span headers, changed only by one-sided
/// CAS, each commit carrying its temporary log.
///
/// - 4-64 KiB (1-16 chunks): one CAS on a span header.
/// - 128 KiB-2 MiB (1-16 spans): one CAS on a section header.
/// - larger: a run of whole sections, announced by an intent record and claimed in one
///   doorbell; a lost race rolls the claimed ones back.
///
/// The commit is the only round trip before the answer in the common case: a pending log
/// of this node on the same header is flushed in the same doorbell, and log flushes and
/// span and section upkeep run after the answer. Protocol code is generic over the fabric:
/// the same code runs on the simulated NIC (immediate or virtual time) and on real verbs.
///
/// ```swift
/// let allocator = try await BlockAllocator.start(
///     owner: OwnerID(1), memoryNodes: [(grant, connection)], runtime: SystemRuntime.shared)
/// let block = try await allocator.allocate(sizeLog2: 0, application: ApplicationID(1))  // 4 KiB
/// try await allocator.free(block, application: ApplicationID(1))
/// ```
public final class BlockAllocator<Connection: FabricConnection>: Sendable {
    public let owner: OwnerID
    public let configuration: AllocatorConfiguration
    let nodes: [MemoryNodeState<Connection>]
    let runtime: any Runtime
    let placement: any PlacementPolicy
    let incarnations: [UInt16]
    let statisticsStore = Locked(AllocatorStatistics())
    let ownedBlocks = Locked<[Block: ApplicationID]>([:])
    let sequence = Locked<UInt64>(0)
    let freeIntentSlots: Locked<[Int]>
    let upkeepInFlight = Locked<Int>(0)

    private init(
        owner: OwnerID, nodes: [MemoryNodeState<Connection>], incarnations: [UInt16], runtime: any Runtime,
        configuration: AllocatorConfiguration, placement: any PlacementPolicy
    ) {
        self.owner = owner
        self.nodes = nodes
        self.incarnations = incarnations
        self.runtime = runtime
        self.configuration = configuration
        self.placement = placement
        let slots = nodes.map(\.geometry.intentSlotsPerNode).min()!
        freeIntentSlots = Locked(Array((0..<slots).reversed()))
    }

    /// Attaches to every memory node: checks its superblock against the grant, takes this
    /// node's slot in its node table (by CAS) and reads its section headers.
    public static func start(
        owner: OwnerID, memoryNodes: [(MemoryNodeGrant, Connection)], runtime: any Runtime,
        configuration: AllocatorConfiguration = AllocatorConfiguration(),
        placement: any PlacementPolicy = RoundRobinPlacement()
    ) async throws(AllocationError) -> BlockAllocator {
        guard !memoryNodes.isEmpty else { throw .noMemoryNodes }
        var states: [MemoryNodeState<Connection>] = []
        var incarnations: [UInt16] = []
        for (index, (grant, connection)) in memoryNodes.enumerated() {
            let state = MemoryNodeState(index: index, grant: grant, connection: connection, owner: owner)
            let key = grant.metadataKey
            let slotAddress = grant.address(grant.geometry.nodeSlotOffset(owner))
            let first: [VerbResult]
            do {
                first = try await connection.post([
                    .readWords(grant.baseAddress, count: 8, rkey: key),
                    .readWords(slotAddress, count: 1, rkey: key),
                    .readWords(state.sectionAddress(0), count: grant.geometry.sectionCount, rkey: key),
                ])
            } catch { throw .fabric(error) }
            let superblock: Superblock
            do { superblock = try Superblock(words: first[0].words) } catch { throw .layout(error) }
            guard superblock.geometry == grant.geometry else {
                throw .layout(.superblockMismatch("pool of \(superblock.geometry.sectionCount) sections, grant says \(grant.geometry.sectionCount)"))
            }
            guard let slot = NodeSlot(rawValue: first[1].words[0]), let registered = slot.registering() else {
                throw .nodeSlotTaken(owner, memoryNode: grant.memoryNode)
            }
            let answer: (exchanged: Bool, original: UInt64)
            do { answer = try await connection.compareAndSwap(slotAddress, expected: slot.rawValue, desired: registered.rawValue, rkey: key) } catch {
                throw .fabric(error)
            }
            guard answer.exchanged else { throw .nodeSlotTaken(owner, memoryNode: grant.memoryNode) }
            let sections = first[2].words
            state.cache.withLock { $0.sections = sections }
            states.append(state)
            incarnations.append(registered.incarnation)
        }
        return BlockAllocator(
            owner: owner, nodes: states, incarnations: incarnations, runtime: runtime, configuration: configuration,
            placement: placement)
    }

    /// The memory nodes, in the order given at start.
    public var memoryNodes: [MemoryNodeGrant] { nodes.map(\.grant) }

    /// Counters so far.
    public var statistics: AllocatorStatistics { statisticsStore.withLock { $0 } }

    /// The largest block one memory node can hold, as log2 of chunks.
    public var maximumSizeLog2: Int {
        let sections = nodes.map(\.geometry.sectionCount).max()!
        return 9 + (Int.bitWidth - 1 - sections.leadingZeroBitCount)
    }

    // MARK: Allocate

    /// Allocates a block of `2^sizeLog2` chunks for `application`, on the memory node the
    /// placement policy picks first that has room.
    public func allocate(sizeLog2: Int, application: ApplicationID) async throws(AllocationError) -> Block {
        guard sizeLog2 >= 0 else { throw .zeroSize }
        let bytes = UInt64(1) << UInt64(min(sizeLog2, 62)) * PoolGeometry.chunkBytes
        guard sizeLog2 <= maximumSizeLog2 else {
            statisticsStore.withLock { $0.failedAllocations += 1 }
            throw .sizeTooLarge(requestedBytes: bytes, maximumBytes: UInt64(1) << UInt64(maximumSizeLog2) * PoolGeometry.chunkBytes)
        }
        let turn = sequence.withLock { s -> UInt64 in defer { s &+= 1 }; return s }
        var trace = OperationTrace()
        do throws(AllocationError) {
            for index in placement.order(memoryNodeCount: nodes.count, sizeLog2: sizeLog2, sequence: turn) {
                let node = nodes[index]
                let block: Block?
                switch sizeLog2 {
                case 0...4: block = try await allocateChunks(sizeLog2: sizeLog2, application: application, on: node, trace: &trace)
                case 5...9: block = try await allocateSpans(sizeLog2: sizeLog2, application: application, on: node, trace: &trace)
                default: block = try await allocateSections(sizeLog2: sizeLog2, application: application, on: node, trace: &trace)
                }
                if let block {
                    ownedBlocks.withLock { $0[block] = application }
                    statisticsStore.withLock { $0.recordAllocation(trace) }
                    return block
                }
            }
        } catch {
            statisticsStore.withLock { $0.failedAllocations += 1 }
            throw error
        }
        statisticsStore.withLock { $0.failedAllocations += 1 }
        throw .outOfMemory(requestedBytes: bytes)
    }

    // MARK: Free

    /// Frees `block` on behalf of `application`. A block this node did not hand to that
    /// application, one already freed, or an address that is not a block start is refused
    /// with a typed error, and nothing changes.
    public func free(_ block: Block, application: ApplicationID) async throws(AllocationError) {
        guard let node = nodes.first(where: { $0.grant.memoryNode == block.memoryNode }) else {
            throw .unknownMemoryNode(block.memoryNode)
        }
        let claim = ownedBlocks.withLock { owned -> ApplicationID? in
            guard let holder = owned[block], holder == application else { return owned[block] }
            owned[block] = nil
            return holder
        }
        guard claim == application else {
            statisticsStore.withLock { $0.failedFrees += 1 }
            if claim != nil { throw .notOwner(block) }
            throw try await classifyForeign(block, application: application, on: node)
        }
        var trace = OperationTrace()
        do throws(AllocationError) {
            switch block.layer {
            case .chunk: try await freeChunks(block, application: application, on: node, trace: &trace)
            case .section: try await freeSpans(block, application: application, on: node, trace: &trace)
            case .multiSection: try await freeSections(block, application: application, on: node, trace: &trace)
            }
        } catch {
            ownedBlocks.withLock { $0[block] = application }
            statisticsStore.withLock { $0.failedFrees += 1 }
            throw error
        }
        statisticsStore.withLock { $0.recordFree(trace) }
    }

    /// Says why this node may not free `block`: someone else holds it, it is not
    /// allocated, or it is not a block start. Reads the full-log record at its first chunk
    /// and the header that commits it, in one doorbell: a block allocated a moment ago shows
    /// in its header's pending log before its record is written.
    private func classifyForeign(_ block: Block, application: ApplicationID, on node: MemoryNodeState<Connection>) async throws(AllocationError) -> AllocationError {
        let geometry = node.geometry
        let address = node.dataAddress(block.firstChunk)
        guard block.firstChunk >= 0, block.firstChunk < geometry.chunkCount, block.firstChunk % block.chunkCount == 0,
              block.chunks.upperBound <= geometry.chunkCount
        else {
            return .notABlockStart(memoryNode: block.memoryNode, address: address)
        }
        let s = block.firstChunk / PoolGeometry.chunksPerSection
        let headerAddress = block.layer == .chunk
            ? node.spanAddress(s, block.firstChunk % PoolGeometry.chunksPerSection / PoolGeometry.chunksPerSpan)
            : node.sectionAddress(s)
        let words: [VerbResult]
        do {
            words = try await node.connection.post([
                .readWords(node.recordAddress(block.firstChunk), count: 1, rkey: node.metadataKey),
                .readWords(headerAddress, count: 1, rkey: node.metadataKey),
            ])
        } catch { throw .fabric(error) }
        if let record = FullLogRecord(rawValue: words[0].words[0]), record != .never, record.sizeLog2 == block.sizeLog2 {
            // A record still saying "ours" belongs to a free of ours whose flush is in flight.
            let ours = record.owner == owner && record.application == application && record.incarnation == incarnations[node.index]
            return record.isAllocated && !ours ? .notOwner(block) : .doubleFree(block)
        }
        if justAllocated(block, header: words[1].words[0]) { return .notOwner(block) }
        return .notABlockStart(memoryNode: block.memoryNode, address: address)
    }

    /// Whether `header`'s pending log is the allocation of exactly `block` by another node.
    private func justAllocated(_ block: Block, header word: UInt64) -> Bool {
        switch block.layer {
        case .chunk:
            guard let span = SpanHeader(rawValue: word), span.logPending, span.log.owner != owner else { return false }
            return Int(span.log.offset) == block.firstChunk % PoolGeometry.chunksPerSpan && Int(span.log.sizeLog2) == block.sizeLog2
                && span.logDescribesAllocation
        case .section:
            guard let section = SectionHeader(rawValue: word), section.logPending, section.log.owner != owner else { return false }
            return Int(section.log.offset) == block.firstChunk % PoolGeometry.chunksPerSection / PoolGeometry.chunksPerSpan
                && Int(section.log.sizeLog2) == block.sizeLog2 - 5 && section.logDescribesAllocation
        case .multiSection:
            guard let section = SectionHeader(rawValue: word), section.logPending, section.log.owner != owner else { return false }
            return section.log.sizeLog2 == SectionHeader.multiSectionSizeCode && section.logDescribesAllocation
        }
    }

    // MARK: Shared steps

    /// Posts `verbs` as one batch on `node`, counting it in `trace`.
    func post(_ verbs: [Verb], on node: MemoryNodeState<Connection>, trace: inout OperationTrace) async throws(AllocationError) -> [VerbResult] {
        trace.batches += 1
        trace.verbs += UInt64(verbs.count)
        do { return try await node.connection.post(verbs) } catch { throw .fabric(error) }
    }

    /// Reads every section and span header of `node` into its cache (one batch).
    func refresh(_ node: MemoryNodeState<Connection>, trace: inout OperationTrace) async throws(AllocationError) {
        statisticsStore.withLock { $0.refreshes += 1 }
        let geometry = node.geometry
        let results = try await post([
            .readWords(node.sectionAddress(0), count: geometry.sectionCount, rkey: node.metadataKey),
            .readWords(node.spanAddress(0, 0), count: geometry.spanCount, rkey: node.metadataKey),
        ], on: node, trace: &trace)
        let sections = results[0].words
        let spans = results[1].words
        node.cache.withLock { cache in
            cache.sections = sections
            cache.spans = spans
            cache.spansKnown = Array(repeating: true, count: sections.count)
        }
    }

    /// The full-log record of an operation this node commits.
    func record(
        allocated: Bool, block: Block, application: ApplicationID, sequence: LogSequence, node: MemoryNodeState<Connection>
    ) -> UInt64 {
        FullLogRecord(
            allocated: allocated, owner: owner, application: application, sizeLog2: block.sizeLog2, layer: block.layer,
            sequence: sequence, incarnation: incarnations[node.index]
        ).rawValue
    }

    /// Waits until this node has no pending log in flight on any of `headers` (a block's
    /// own earlier flush), with backoff and a bound.
    func waitForOwnFlushes(_ headers: [RemoteAddress], on node: MemoryNodeState<Connection>) async throws(AllocationError) {
        var backoff = Backoff(configuration)
        while node.pending.withLock({ table in headers.contains { table.has($0) } }) {
            try await backoff.pause(runtime)
        }
    }

    // MARK: Upkeep after the answer

    /// Runs `body` as background upkeep of this node; `quiesce()` waits for all of it.
    func startUpkeep(_ body: @escaping @Sendable () async -> OperationTrace) {
        upkeepInFlight.withLock { $0 += 1 }
        runtime.spawn { [self] in
            let trace = await body()
            statisticsStore.withLock { s in
                s.upkeepBatches += trace.batches
                s.upkeepVerbs += trace.verbs
            }
            upkeepInFlight.withLock { $0 -= 1 }
        }
    }

    /// Waits until every log flush and every span and section upkeep has finished.
    public func quiesce() async {
        var delay = configuration.backoffNanos
        while upkeepInFlight.withLock({ $0 }) > 0 {
            await runtime.sleep(nanoseconds: delay)
            delay = min(delay * 2, 64 * configuration.backoffNanos)
        }
    }

    /// Flushes this node's pending log on a header unless another task holds the job:
    /// writes the record and, in the same doorbell, replaces the header by `transform` of
    /// its flushed self (by default just the cleared pending bit). A failed CAS is retried
    /// with the word it returns (others may have changed span states); a cached word that
    /// does not show the log is re-read once. Answers the word written, or nil.
    func flush<Header: LoggedHeader>(
        _ type: Header.Type, header address: RemoteAddress, cached: UInt64, on node: MemoryNodeState<Connection>,
        trace: inout OperationTrace, then transform: (Header) -> Header = { $0 }
    ) async -> UInt64? {
        guard let log = node.pending.withLock({ $0.take(address) }) else { return nil }
        defer { node.pending.withLock { $0.remove(address, sequence: log.sequence) } }
        var current = cached
        var verbs: [Verb] = [.writeWord(log.recordAddress, log.record, rkey: node.metadataKey)]
        var reread = false
        for _ in 0..<configuration.maxAttempts {
            guard let header = Header(rawValue: current), header.logPending, header.log.owner == owner, let flushed = header.flushed() else {
                // The cache may be stale: look once; otherwise recovery owns the log.
                guard !reread else { return nil }
                reread = true
                verbs.append(.readWords(address, count: 1, rkey: node.metadataKey))
                guard let results = try? await post(verbs, on: node, trace: &trace) else { return nil }
                current = results.last!.words[0]
                verbs = []
                continue
            }
            let target = transform(flushed)
            verbs.append(.compareAndSwap(address, expected: current, desired: target.rawValue, rkey: node.metadataKey))
            guard let results = try? await post(verbs, on: node, trace: &trace) else { return nil }
            let answer = results.last!.compareAndSwap
            if answer.exchanged { return target.rawValue }
            current = answer.original
            verbs = []
        }
        return nil
    }
}

/// Bounded exponential backoff for waits on someone else's progress: a pending log another
/// task or node is flushing, an intent slot, an own flush in flight.
struct Backoff {
    private let configuration: AllocatorConfiguration
    private var delay: UInt64
    private(set) var waits = 0

    init(_ configuration: AllocatorConfiguration) {
        self.configuration = configuration
        delay = configuration.backoffNanos
    }

    /// Sleeps the current delay and doubles it (up to 256 times the base); fails after
    /// `maxWaits` pauses.
    mutating func pause(_ runtime: any Runtime) async throws(AllocationError) {
        guard waits < configuration.maxWaits else { throw .retryLimitExceeded(attempts: waits) }
        waits += 1
        await runtime.sleep(nanoseconds: delay)
        delay = min(delay * 2, 256 * configuration.backoffNanos)
    }
}

/// Whether a header word carries a pending log.
func isPendingLog<Header: LoggedHeader>(_ type: Header.Type, _ word: UInt64) -> Bool {
    Header(rawValue: word)?.logPending ?? false
}

extension BlockAllocator {
    /// After a lost CAS: if it lost to a pending log (its flush is on its way), wait with
    /// backoff, bounded by `maxWaits`; otherwise another operation committed first, which
    /// spends one of the `maxAttempts`.
    func lost(to pendingLog: Bool, backoff: inout Backoff, trace: inout OperationTrace) async throws(AllocationError) {
        if pendingLog {
            trace.pendingLosses += 1
            try await backoff.pause(runtime)
        } else {
            trace.attempts += 1
        }
    }

    func lost<Header: LoggedHeader>(to original: UInt64, _ type: Header.Type, backoff: inout Backoff, trace: inout OperationTrace) async throws(AllocationError) {
        try await lost(to: isPendingLog(type, original), backoff: &backoff, trace: &trace)
    }
}
