import Atomics

/// FineMem's allocation protocol for one compute node, over one link to each memory node:
/// a two-layer bitmap tree of section and span headers, changed only by one-sided CAS,
/// each block operation carrying its temporary log.
///
/// - 4-64 KiB (1-16 chunks): one CAS on a span header (the chunk layer).
/// - 128 KiB-2 MiB (1-16 spans): one CAS on a section header (the section layer).
/// - larger: a run of whole sections, announced by an intent record and claimed in one
///   doorbell; a lost race rolls the claimed ones back (`allocateSections`).
///
/// The commit is the only round trip before the answer in the common case: a pending log
/// of this node on the same header is flushed in the same doorbell, and log flushes and
/// span and section upkeep run after the answer. The code knows the fabric only through
/// `FabricConnection`: the same code runs on the simulated NIC and on real verbs.
///
/// Invariants this code keeps (the inspector checks them from outside; the write-ahead
/// log's rules L1-L6 are stated in `LogWriter.swift`):
/// 1. No two live blocks overlap: a block is handed out only after the CAS that marks it
///    in its header committed, and that CAS expected the run clear.
/// 2. A span has chunks in use only while it is `open` and its section entry is in chunk
///    mode; a section entry is `whole` only while a section-layer or multi-section block
///    holds it; a span is `opening` or `closing` only in the middle of an open or close by
///    the node its log names, and no chunk-mode entry is over a `closed` span.
/// 3. A header's pending log names the node that committed it; only that node (or, after
///    fencing it, recovery) clears the bit, after updating the record by CAS.
/// 4. Every decision that changes remote state rests on a CAS whose expected value is the
///    word it was made on; a decision not to change it rests on a fresh READ.
/// 5. Contention never ends an allocation while room may exist (only `waitCountMax`
///    pauses do); no room is answered only on two full reads made during the call
///    that show no room for the request throughout the time between them (DESIGN.md
///    invariant 7).
///
/// ```swift
/// let allocator = try await BlockAllocator.start(
///     owner: OwnerID(1), memoryNodes: [(grant, connection)], runtime: SystemRuntime.shared)
/// let block = try await allocator.allocate(chunkCountLog2: 0, application: ApplicationID(1))  // 4 KiB
/// try await allocator.free(block, application: ApplicationID(1))
/// ```
package final class BlockAllocator: Sendable {
    package let owner: OwnerID
    let configuration: AllocatorConfiguration
    package let links: [MemoryNodeLink]
    let runtime: any Runtime
    let placement: any PlacementPolicy
    /// The largest block one memory node can hold, as log2 of chunks.
    let chunkCountLog2Max: Int
    /// Counters, in stripes by application (`recordStatistics`), summed when read.
    private let statisticsStripes = LockedStripes(count: BlockAllocator.stripes) { _ in AllocatorStatistics() }
    /// The blocks this compute node handed out, by where they start (`BlockStart.key`), in
    /// stripes by that key (`withOwnedBlocks`).
    private let ownedBlockStripes = LockedStripes(count: BlockAllocator.stripes) { _ in IntMap<Holding>(capacity: 256) }
    /// The turn of the next allocation (the placement policy's rotation).
    let sequence = ManagedAtomic<UInt64>(0)
    let freeIntentSlots: Locked<[Int]>
    /// Upkeep waiting for this node's workers, and the workers (`Upkeep.swift`).
    let upkeep = Locked(UpkeepQueue())
    /// Memory nodes on which a lease renewal found this node fenced, and how many (read
    /// without the lock on every operation: almost always zero).
    let fencedOn = Locked<Set<NodeID>>([])
    let fencedCount = ManagedAtomic<Int>(0)
    /// Whether the lease renewal loop runs.
    let leaseRenewal = Locked(false)
    /// Tasks this node has spawned (upkeep workers, lease renewal): the fast path spawns
    /// none of its own, which a test checks by this count.
    private let spawned = ManagedAtomic<UInt64>(0)

    /// Where a block starts: its memory node's link and its first chunk, as the key of
    /// `ownedBlocks`.
    struct BlockStart {
        let key: Int
        init(_ block: Block, on link: MemoryNodeLink, links: Int) { key = block.firstChunk &* links &+ link.index }
    }

    /// Who holds a block this node handed out, and its size.
    struct Holding: Hashable, Sendable {
        let chunkCountLog2: Int
        let application: ApplicationID
    }

    private init(owner: OwnerID, links: [MemoryNodeLink], runtime: any Runtime, configuration: AllocatorConfiguration, placement: any PlacementPolicy) {
        self.owner = owner
        self.links = links
        self.runtime = runtime
        self.configuration = configuration
        self.placement = placement
        let sections = links.map(\.geometry.sectionCount).max()!
        chunkCountLog2Max = Block.sectionLayerCountLog2Max + (Int.bitWidth - 1 - sections.leadingZeroBitCount)
        let slots = links.map(\.geometry.intentSlotsPerNode).min()!
        freeIntentSlots = Locked(Array((0..<slots).reversed()))
    }

    /// Attaches to every memory node (checks its superblock against the grant, takes this
    /// node's slot in its node table by CAS, reads its section headers).
    package static func start(
        owner: OwnerID, memoryNodes: [(MemoryNodeGrant, any FabricConnection)], runtime: any Runtime,
        configuration: AllocatorConfiguration = AllocatorConfiguration(),
        placement: any PlacementPolicy = RoundRobinPlacement()
    ) async throws(AllocationError) -> BlockAllocator {
        guard !memoryNodes.isEmpty else { throw .noMemoryNodes }
        var links: [MemoryNodeLink] = []
        for (index, (grant, connection)) in memoryNodes.enumerated() {
            do {
                links.append(try await MemoryNodeLink.attach(
                    index: index, grant: grant, connection: connection, owner: owner, cacheShards: configuration.cacheShards ?? runtime.parallelism))
            } catch {
                switch error {
                case .fabric(let error): throw .fabric(error)
                case .layout(let error): throw .layout(error)
                case .slotTaken: throw .nodeSlotTaken(slot: owner.rawValue, memoryNode: grant.memoryNode)
                }
            }
        }
        return BlockAllocator(owner: owner, links: links, runtime: runtime, configuration: configuration, placement: placement)
    }

    /// Shards of this node's header cache of memory node `index` (its position in the
    /// node's list): as configured (`AllocatorConfiguration.cacheShards`), or fewer on a
    /// small pool, since a shard holds at least 4 sections. A test that means to run on
    /// several shards asserts that it has them.
    package func cacheShards(memoryNode index: Int = 0) -> Int { links[index].cache.count }

    /// Connections ("lanes") this node posts on to memory node `index`: a connection per
    /// cache shard and one for the upkeep where the backend opens more (the simulated
    /// NIC) and the cache has several shards, else one.
    package func lanes(memoryNode index: Int = 0) -> Int { links[index].laneCount }

    /// Tasks this node has spawned so far.
    package var spawnedTasks: UInt64 { spawned.load(ordering: .relaxed) }

    /// Starts `body` as a task of this node's runtime, counted in `spawnedTasks`.
    func spawn(_ body: @escaping @Sendable () async -> Void) {
        spawned.wrappingIncrement(ordering: .relaxed)
        runtime.spawn(body)
    }

    /// Counters so far.
    package var statistics: AllocatorStatistics {
        (0..<Self.stripes).reduce(AllocatorStatistics()) { sum, index in sum + statisticsStripes.withLock(index) { $0 } }
    }

    /// Stripes of the owned blocks and of the counters: tasks of different applications
    /// (and blocks at different places) share no lock and no cache line.
    static let stripes = 16

    /// Counts an operation of `application` (nil: the upkeep's).
    func recordStatistics(_ application: ApplicationID?, _ record: (inout AllocatorStatistics) -> Void) {
        statisticsStripes.withLock(Int(application?.rawValue ?? 0) % Self.stripes, record)
    }

    /// Runs `body` on the owned blocks' stripe of the block that starts at `start`
    /// (`BlockStart.key`).
    func withOwnedBlocks<Result>(_ start: Int, _ body: (inout IntMap<Holding>) -> Result) -> Result {
        // Hashed: blocks of 16 chunks and more all start at multiples of 16.
        ownedBlockStripes.withLock(Int(truncatingIfNeeded: (UInt64(start) &* 0x9E37_79B9_7F4A_7C15) >> 60) % Self.stripes, body)
    }


    /// The link to `memoryNode`.
    func link(to memoryNode: NodeID) throws(AllocationError) -> MemoryNodeLink {
        guard let link = links.first(where: { $0.memoryNode == memoryNode }) else { throw .unknownMemoryNode(memoryNode) }
        return link
    }

    /// The pointer to a block's first byte.
    func pointer(to block: Block, on link: MemoryNodeLink) -> RemotePointer {
        RemotePointer(memoryNode: block.memoryNode, address: link.grant.dataAddress(chunk: block.firstChunk))!
    }

    // MARK: Allocate

    /// Allocates a block of `2^chunkCountLog2` chunks for `application`, on the first
    /// memory node that has room, from the one the placement policy names first.
    ///
    /// Out of memory is answered when no reachable memory node had room at one instant
    /// of the call: each node's search ends on two full reads that show no room
    /// throughout the time between them (`FullRead.noRoomThroughout`); with several
    /// nodes, one more read of each node but the last one asked must show the same (room
    /// may have moved from a node not yet asked to one already asked: `noRoomStands`).
    /// When it does not, the nodes are asked again after a pause, at most
    /// `noRoomRoundsMax` times in all.
    package func allocate(chunkCountLog2: Int, application: ApplicationID) async throws(AllocationError) -> Block {
        guard chunkCountLog2 >= 0 else { throw .zeroSize }
        let fencedThere = fencedCount.load(ordering: .acquiring) == 0 ? [] : fencedOn.withLock { $0 }
        func reachable(_ link: MemoryNodeLink) -> Bool { !fencedThere.contains(link.memoryNode) && !link.isBroken }
        guard links.contains(where: reachable) else { throw .fenced(memoryNode: links.map(\.memoryNode).min()!) }
        let chunkBytes = PoolGeometry.chunkBytes
        guard chunkCountLog2 <= chunkCountLog2Max else {
            recordStatistics(application) { $0.recordFailedAllocation(OperationTrace()) }
            throw .sizeTooLarge(
                requestedBytes: chunkBytes << UInt64(min(chunkCountLog2, 50)), maximumBytes: chunkBytes << UInt64(chunkCountLog2Max))
        }
        // The turn matters only to the placement among memory nodes (a shared counter).
        let turn = links.count == 1 ? 0 : sequence.loadThenWrappingIncrement(ordering: .relaxed)
        var trace = OperationTrace(lane: Int(application.rawValue))
        var unreachable: FabricError?
        do throws(AllocationError) {
            let first = placement.firstNode(memoryNodeCount: links.count, chunkCountLog2: chunkCountLog2, sequence: turn)
            var roundsBackoff = Backoff(configuration)
            for round in 1...Self.noRoomRoundsMax {
                var noRoom: [(link: MemoryNodeLink, read: FullRead?)] = []
                for offset in 0..<links.count {
                    let link = links[(first + offset) % links.count]
                    guard reachable(link) else { continue }
                    var read: FullRead?
                    let block: Block?
                    do throws(AllocationError) {
                        block = try await allocate(chunkCountLog2: chunkCountLog2, application: application, on: link, noRoomRead: &read, trace: &trace)
                    } catch {
                        // A broken connection stays broken: that memory node is out of reach
                        // (fenced, or dead) for this incarnation; the others may have room.
                        guard case .fabric(let fabricError) = error else { throw error }
                        markUnusable(link)
                        unreachable = unreachable ?? fabricError
                        continue
                    }
                    link.checkInvariants()
                    guard let block else {
                        noRoom.append((link, read))
                        continue
                    }
                    handOut(block, chunkCountLog2: chunkCountLog2, application: application, on: link)
                    recordStatistics(application) { $0.recordAllocation(trace) }
                    return block
                }
                if try await noRoomStands(noRoom, chunkCountLog2: chunkCountLog2, unreachable: &unreachable, trace: &trace) { break }
                guard round < Self.noRoomRoundsMax else { throw .retryLimitExceeded(attempts: round) }
                try await roundsBackoff.pause(runtime)
            }
        } catch {
            recordStatistics(application) { $0.recordFailedAllocation(trace) }
            throw error
        }
        if let unreachable {
            recordStatistics(application) { $0.recordFailedAllocation(trace) }
            throw .fabric(unreachable)
        }
        recordStatistics(application) { $0.recordOutOfMemory(trace) }
        throw .outOfMemory(requestedBytes: chunkBytes << UInt64(chunkCountLog2))
    }

    /// Rounds over the memory nodes before a search that keeps finding room moved
    /// elsewhere answers `retryLimitExceeded`.
    static let noRoomRoundsMax = 16

    /// Allocates on one memory node, in the layer of the size; nil when it has no room,
    /// with `noRoomRead` the full read its answer rests on (nil when the node cannot hold
    /// the size at all).
    private func allocate(
        chunkCountLog2: Int, application: ApplicationID, on link: MemoryNodeLink, noRoomRead: inout FullRead?, trace: inout OperationTrace
    ) async throws(AllocationError) -> Block? {
        switch Block.layer(chunkCountLog2: chunkCountLog2) {
        case .chunk:
            try await allocate(in: SpanHeader.self, chunkCountLog2: chunkCountLog2, application: application, on: link, noRoomRead: &noRoomRead, trace: &trace)
        case .section:
            try await allocate(in: SectionHeader.self, chunkCountLog2: chunkCountLog2, application: application, on: link, noRoomRead: &noRoomRead, trace: &trace)
        case .multiSection:
            try await allocateSections(chunkCountLog2: chunkCountLog2, application: application, on: link, noRoomRead: &noRoomRead, trace: &trace)
        }
    }

    /// Whether the memory nodes' answers of no room hold together. Each node's search
    /// ended on two full reads that show no room throughout the time between them, the
    /// nodes one after the other; with several, room may have moved from a node not yet
    /// asked to one already asked. So every node but the last one asked is read once
    /// more, after the last one's search ended, and its search's last read and this one
    /// must show no room throughout the time between them. Every node then had no room
    /// at the instant the last node's second read began: each other node's first read
    /// ended before that node's search began, and its second read began after the last
    /// node's search ended (`beginningAfter`).
    ///
    /// A node whose words changed in that long window (blocks taken elsewhere in it)
    /// gets shorter ones: each node's latest read is its first, and every node is read
    /// again, each read begun after every first ended, up to `noRoomPassesMax` times. A
    /// read that shows room ends the check (the search goes on). A node that cannot hold
    /// the size at all (no read) does not count; a node whose read fails is out of reach
    /// from then on.
    private func noRoomStands(
        _ answers: [(link: MemoryNodeLink, read: FullRead?)], chunkCountLog2: Int, unreachable: inout FabricError?, trace: inout OperationTrace
    ) async throws(AllocationError) -> Bool {
        var nodes = answers.compactMap { answer in answer.read.map { (link: answer.link, first: $0) } }
        guard nodes.count > 1 else { return true }
        var reading = Array(nodes.indices.dropLast())
        for pass in 0...Self.noRoomPassesMax {
            let started = reading.map { nodes[$0].link.refreshesStarted }
            var stands = true
            var reachable: [Int] = []
            for (index, started) in zip(reading, started) {
                let read: FullRead
                do throws(AllocationError) {
                    read = try await refresh(nodes[index].link, beginningAfter: started, trace: &trace)
                } catch {
                    guard case .fabric(let fabricError) = error else { throw error }
                    markUnusable(nodes[index].link)
                    unreachable = unreachable ?? fabricError
                    continue
                }
                if read.hasRoom(chunkCountLog2: chunkCountLog2) { return false }
                if !read.noRoomThroughout(since: nodes[index].first, chunkCountLog2: chunkCountLog2) { stands = false }
                nodes[index].first = read
                reachable.append(index)
            }
            if stands { return true }
            guard pass < Self.noRoomPassesMax else { break }
            // Every reachable node's latest read (the last node's: its search's second)
            // is now its first.
            reading = pass == 0 ? reachable + [nodes.count - 1] : reachable
        }
        return false
    }

    /// Passes of short windows `noRoomStands` makes after the long one failed.
    static let noRoomPassesMax = 2

    /// Records `block` as handed out to `application`, after checking that it is what was
    /// asked and that this node did not hand it out already.
    private func handOut(_ block: Block, chunkCountLog2: Int, application: ApplicationID, on link: MemoryNodeLink) {
        precondition(block.chunkCountLog2 == chunkCountLog2 && block.fits(link.geometry), "allocated \(block) for 2^\(chunkCountLog2) chunks")
        let start = BlockStart(block, on: link, links: links.count).key
        let previous = withOwnedBlocks(start) { owned in
            defer { owned[start] = Holding(chunkCountLog2: chunkCountLog2, application: application) }
            return owned[start]
        }
        precondition(previous == nil, "\(block) handed out twice by \(owner)")
    }

    // MARK: Free

    /// Frees `block` on behalf of `application`. A block this node did not hand to that
    /// application, one already freed, or a block that does not start there with that
    /// size is refused with a typed error, and nothing changes.
    package func free(_ block: Block, application: ApplicationID) async throws(AllocationError) {
        let link = try link(to: block.memoryNode)
        guard isUsable(link) else { throw .fenced(memoryNode: link.memoryNode) }
        let wanted = Holding(chunkCountLog2: block.chunkCountLog2, application: application)
        let start = BlockStart(block, on: link, links: links.count).key
        let holding = withOwnedBlocks(start) { owned -> Holding? in
            let holding = owned[start]
            if holding == wanted { owned[start] = nil }
            return holding
        }
        var trace = OperationTrace(lane: Int(application.rawValue))
        guard holding == wanted else {
            let error: AllocationError
            if let holding {
                error = holding.chunkCountLog2 == block.chunkCountLog2 ? .notOwner(pointer(to: block, on: link)) : .notABlockStart(pointer(to: block, on: link))
            } else {
                error = try await classifyForeign(block, application: application, on: link, trace: &trace)
            }
            recordStatistics(application) { $0.recordFailedFree(trace) }
            throw error
        }
        do throws(AllocationError) {
            switch block.layer {
            case .chunk: try await free(block, in: SpanHeader.self, application: application, on: link, trace: &trace)
            case .section: try await free(block, in: SectionHeader.self, application: application, on: link, trace: &trace)
            case .multiSection: try await freeSections(block, application: application, on: link, trace: &trace)
            }
        } catch {
            withOwnedBlocks(start) { $0[start] = holding }
            recordStatistics(application) { $0.recordFailedFree(trace) }
            throw error
        }
        link.checkInvariants()
        recordStatistics(application) { $0.recordFree(trace) }
    }

    /// The block this node handed to `application` that starts at `pointer`.
    func heldBlock(at pointer: RemotePointer, application: ApplicationID) throws(AllocationError) -> Block {
        let link = try link(to: pointer.memoryNode)
        guard let chunk = link.grant.chunk(startingAt: pointer.address) else { throw .notABlockStart(pointer) }
        let start = BlockStart(Block(memoryNode: pointer.memoryNode, firstChunk: chunk, chunkCountLog2: 0), on: link, links: links.count).key
        guard let holding = withOwnedBlocks(start, { $0[start] }) else { throw .notABlockStart(pointer) }
        guard holding.application == application else { throw .notOwner(pointer) }
        return Block(memoryNode: pointer.memoryNode, firstChunk: chunk, chunkCountLog2: holding.chunkCountLog2)
    }

    /// Says why this node may not free `block`: someone else holds it, it is not
    /// allocated, or it is not a block start. Reads the header that commits it, then the
    /// full-log record at its first chunk, in one doorbell, and trusts the header first: a
    /// block allocated a moment ago shows in its header's pending log before its record is
    /// written (the record READ may still find an older block's), and the flush writes the
    /// record before it clears the log, so whichever way another node's flush falls between
    /// the two READs (other connections' verbs may run between them), one of them shows
    /// the allocation. (Both found by `fuzz-allocator`: the record read first, or trusted
    /// first, hid a fresh allocation.)
    private func classifyForeign(_ block: Block, application: ApplicationID, on link: MemoryNodeLink, trace: inout OperationTrace) async throws(AllocationError) -> AllocationError {
        let pointer = pointer(to: block, on: link)
        guard block.fits(link.geometry) else { return .notABlockStart(pointer) }
        let results: [VerbResult]
        do {
            results = try await link.post([
                link.read(HeaderSlot(committing: block)),
                .readWords(link.grant.recordAddress(chunk: block.firstChunk), count: 1, rkey: link.metadataKey),
            ], trace: &trace)
        } catch { throw .fabric(error) }
        let (headerWord, recordWord) = (results[0].words[0], results[1].words[0])
        // The header first: its pending log is newer than the record it is yet to write.
        if justAllocatedByAnother(block, header: headerWord) { return .notOwner(pointer) }
        if let record = FullLogRecord(rawValue: recordWord), record != .never, record.chunkCountLog2 == block.chunkCountLog2 {
            // A record still saying "ours" belongs to a free of ours whose flush is in flight.
            let ours = record.owner == owner && record.application == application && record.incarnation == link.incarnation
            return record.isAllocated && !ours ? .notOwner(pointer) : .doubleFree(pointer)
        }
        return .notABlockStart(pointer)
    }

    /// Whether `header`'s pending log is another node's allocation of exactly `block`.
    private func justAllocatedByAnother(_ block: Block, header word: UInt64) -> Bool {
        switch block.layer {
        case .chunk: return pendingAllocationByAnother(SpanHeader.self, word, of: SpanHeader.run(of: block))
        case .section: return pendingAllocationByAnother(SectionHeader.self, word, of: SectionHeader.run(of: block))
        case .multiSection:
            guard let section = SectionHeader(rawValue: word), section.logPending, section.log.owner != owner else { return false }
            return section.log.sizeCode == SectionHeader.multiSectionSizeCode && section.isAllWhole
        }
    }

    private func pendingAllocationByAnother<Header: BlockHeader>(_ type: Header.Type, _ word: UInt64, of run: HeaderRun) -> Bool {
        guard let header = Header(rawValue: word), header.logPending, header.log.owner != owner else { return false }
        return header.log.run == run && header.marksAllocated(run)
    }

    // MARK: Searching and waiting

    /// The state of one allocation's search on one memory node. Room and contention end a
    /// search differently: no room is answered only when two full reads made during the
    /// call, one after the other, show no room for the request throughout the time
    /// between them (`noRoomInCache`); contention (commits lost to other nodes, choices the
    /// cache made stale) never ends it while room may exist: after `operationAttemptsMax`
    /// spent choices it pauses and reads afresh (`beginRound`), and only `waitCountMax`
    /// pauses in all make it answer `retryLimitExceeded`.
    struct Search {
        /// The size asked for, as log2 of chunks.
        let chunkCountLog2: Int
        /// Whether this search looked through the room summary.
        var lookedInSummary = false
        /// The last full read this search made or shared.
        var lastRead: FullRead?
        /// Second reads that could not show the pool without room (`noRoomInCache`).
        var unprovenNoRoom = 0
        var backoff: Backoff
        /// The rounds this search may take. Every round spends an attempt, pauses, or
        /// reads the span headers of a section not read before (the first summary look
        /// and full read aside); a pause follows every `operationAttemptsMax` attempts, and
        /// the pauses are bounded (`waitCountMax`). So the other bounds end a search first;
        /// this one turns a round that neither spends nor pauses (a bug) into
        /// `retryLimitExceeded` rather than a search without end.
        let roundsMax: Int
        init(_ configuration: AllocatorConfiguration, chunkCountLog2: Int, sectionCount: Int) {
            self.chunkCountLog2 = chunkCountLog2
            backoff = Backoff(configuration)
            roundsMax = sectionCount + 4 * (configuration.waitCountMax + 1) * (configuration.operationAttemptsMax + 1)
        }
    }

    /// Starts a round of the search: after `operationAttemptsMax` spent choices, pause and
    /// look again from a fresh read.
    func beginRound(_ search: inout Search, on link: MemoryNodeLink, trace: inout OperationTrace) async throws(AllocationError) {
        guard trace.attempts >= configuration.operationAttemptsMax else { return }
        trace.attempts = 0
        try await search.backoff.pause(runtime)
        search.lastRead = try await refresh(link, trace: &trace)
    }

    /// The cache shows no room: look through the room summary for sections with room the
    /// cache does not know of (a few KiB), and when it shows none, read every header
    /// (answers false: search again). After a full read, answers true (no room) only when
    /// another full read, posted after it, shows every place the request could take held
    /// throughout the time between the two, by words that did not change
    /// (`FullRead.noRoomThroughout`): then the pool had no room at an instant of the call.
    /// Otherwise the search goes on from the newer read. When the two reads show other
    /// allocations, room may have appeared or moved since the first (a lost race right
    /// after a full read shows no room in the cache, and a full read is four READs, not
    /// one instant): that counts an attempt (and, after a few, a pause), and after
    /// `unprovenNoRoomMax` such pairs the search answers `retryLimitExceeded`. When they show the same allocations and room
    /// the search cannot take yet (in the middle of another node's operation: a span
    /// being closed, a free's log pending), the search pauses first (`backoff`, bounded by
    /// `waitCountMax`). A section held whole by a multi-section claim still in flight is
    /// held at that instant, like any block.
    func noRoomInCache(_ search: inout Search, on link: MemoryNodeLink, trace: inout OperationTrace) async throws(AllocationError) -> Bool {
        if let previous = search.lastRead {
            let current = try await refresh(link, trace: &trace)
            search.lastRead = current
            if current.noRoomThroughout(since: previous, chunkCountLog2: search.chunkCountLog2) { return true }
            if current.showsSameAllocations(as: previous) {
                try await search.backoff.pause(runtime)
            } else {
                trace.attempts += 1
                search.unprovenNoRoom += 1
                guard search.unprovenNoRoom < Self.unprovenNoRoomMax else { throw .retryLimitExceeded(attempts: search.unprovenNoRoom) }
                // Room that moved is found at once; reads that keep differing wait for the
                // pool to settle a little.
                if search.unprovenNoRoom > Self.unprovenNoRoomUnpaused { try await search.backoff.pause(runtime) }
            }
            return false
        }
        if !search.lookedInSummary {
            search.lookedInSummary = true
            let found: Int
            do {
                found = try await link.refreshFromSummary(wordsMax: Self.summaryWordsMax, sectionsMax: Self.summarySectionsMax, trace: &trace)
            } catch { throw .fabric(error) }
            if found > 0 { return false }
        }
        search.lastRead = try await refresh(link, trace: &trace)
        return false
    }

    /// Pairs of full reads that differ, a search finding no room after each, before it
    /// answers `retryLimitExceeded`: a pool that
    /// stays full while a span that blocks the only candidate churns (its blocks change
    /// all the time, so no read shows it held throughout) would otherwise keep the search
    /// reading. Each pair is a round trip or two; after the first
    /// `unprovenNoRoomUnpaused`, each also pauses (the search's backoff).
    static let unprovenNoRoomMax = 64
    static let unprovenNoRoomUnpaused = 8

    /// How far a look through the room summary goes: summary words read, and sections
    /// whose headers are read.
    static let summaryWordsMax = 4
    static let summarySectionsMax = 8

    /// Reads every header of `link` into its cache (or shares another task's read begun
    /// after this call), and answers the words read.
    @discardableResult
    package func refresh(_ link: MemoryNodeLink, beginningAfter generation: UInt64? = nil, trace: inout OperationTrace) async throws(AllocationError) -> FullRead {
        defer { takeEffects(of: &trace, on: link) }
        do {
            return try await link.refresh(
                beginningAfter: generation, trace: &trace, runtime: runtime, pauseNanos: configuration.backoffNanos)
        } catch { throw .fabric(error) }
    }

    /// After a lost CAS: if it lost to a pending log (its flush is on its way), wait with
    /// backoff; otherwise another operation committed first, which spends an attempt.
    func lost(toPendingLog pendingLoss: Bool, backoff: inout Backoff, trace: inout OperationTrace) async throws(AllocationError) {
        if pendingLoss {
            trace.pendingLosses += 1
            try await backoff.pause(runtime)
        } else {
            trace.attempts += 1
        }
    }

    /// Waits until this node has no pending log in flight on any of `slots` (a block's own
    /// earlier flush), with backoff and a bound.
    func waitForOwnFlushes(_ slots: [HeaderSlot], on link: MemoryNodeLink) async throws(AllocationError) {
        var backoff = Backoff(configuration)
        while slots.contains(where: { slot in link.cache.withShard(of: slot) { $0.pending.has(slot) } }) {
            try await backoff.pause(runtime)
        }
    }

    /// Marks `slot` busy for this node's CAS (a free's), waiting (with backoff) while
    /// another task of this node has a CAS in flight on it (two tasks of one node racing
    /// for one header would only cost each other a round trip), or while other nodes have
    /// their turn on it (a free of this node landing in the turn would keep them waiting
    /// again: `UpkeepItem`). The waits count against `backoff`, the operation's own.
    func acquireBusy(_ slot: HeaderSlot, on link: MemoryNodeLink, backoff: inout Backoff) async throws(AllocationError) {
        while !link.tryAcquireOutsideTurn(slot, now: runtime.nowNanoseconds) { try await backoff.pause(runtime) }
    }

    /// Flushes this node's log on `slot` (see `MemoryNodeLink.flush`).
    func flush<Header: LoggedHeader>(
        _ type: Header.Type, _ slot: HeaderSlot, on link: MemoryNodeLink, trace: inout OperationTrace, then transform: (Header) -> Header = { $0 }
    ) async -> Header? {
        defer { takeEffects(of: &trace, on: link) }
        return await link.flush(
            type, slot, attemptsMax: configuration.flushAttemptsMax, backoffNanos: configuration.backoffNanos,
            runtime: runtime, trace: &trace, then: transform)
    }

    /// Acts on what a call of `link` left in `trace` (`LinkEffects`): a log given back is
    /// queued to be flushed, a change of room to have its summary bits synced. Every
    /// call of the allocator that can leave effects is followed by this; an operation's
    /// trace ends with none (`AllocatorStatistics` checks).
    @inline(__always)
    func takeEffects(of trace: inout OperationTrace, on link: MemoryNodeLink) {
        guard !trace.effects.isEmpty else { return }
        let effects = trace.effects.take()
        for slot in effects.returnedLogs { startUpkeep(of: slot, on: link) }
        if let sections = effects.roomChanged { startRoomSummaryUpkeep(of: sections, on: link) }
    }
}

/// Bounded exponential backoff for waits on someone else's progress: a pending log another
/// task or node is flushing, a busy header or intent slot, an own flush in flight.
struct Backoff {
    private let waitCountMax: Int
    private var pause: Pause
    var waits: Int { pause.count }

    init(_ configuration: AllocatorConfiguration) {
        waitCountMax = configuration.waitCountMax
        pause = Pause(configuration.backoffNanos)
    }

    /// Sleeps the current delay and doubles it (up to `backoffNanosMax`); fails after
    /// `waitCountMax` pauses.
    mutating func pause(_ runtime: any Runtime) async throws(AllocationError) {
        guard waits < waitCountMax else { throw .retryLimitExceeded(attempts: waits) }
        await pause.sleep(on: runtime)
    }
}
