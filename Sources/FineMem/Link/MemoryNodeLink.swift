import Atomics

/// Errors of attaching a compute node to a memory node.
enum AttachError: Error, Sendable {
    case fabric(FabricError)
    case layout(LayoutError)
    /// The compute node's slot in the node table is not free.
    case slotTaken
}

/// What a compute node keeps about one memory node: the connection and grant, a cache of
/// the header words, and its own pending logs there. Every remote metadata access of the
/// protocol goes through a link: reads of headers, the one update primitive
/// (`update`, `updateEach`), and the write-ahead log (`flush`, `flushRun`).
package final class MemoryNodeLink: Sendable {
    /// The position of this memory node in the compute node's list.
    let index: Int
    let grant: MemoryNodeGrant
    /// The connection of the attach, the leases and recovery, and the first lane.
    let connection: any FabricConnection
    /// A connection per cache shard and one for the upkeep when the backend opens more
    /// (`FabricConnection.sibling`), else the one: an operation posts on its lane's
    /// (`connection(for:)`), so that tasks working in different shards, and the upkeep,
    /// share no queue pair's lock either.
    private let lanes: [any FabricConnection]
    /// The compute node (its slot in the node table) and its incarnation there.
    let owner: OwnerID
    let incarnation: UInt16
    /// The header cache, with this node's pending logs on those headers (`pending`), in
    /// shards.
    let cache: HeaderCacheShards
    /// This node's node-table slot as its last lease renewal (or the attach) left it.
    let leaseWord: Locked<UInt64>
    /// The ticket of the next batch: answers of later batches are newer (`HeaderCache`).
    private let nextTicket = ManagedAtomic<UInt64>(0)
    /// The full refreshes of this link: one in flight at a time, shared by the tasks that
    /// ask for one while it is (`refresh`).
    private let refreshFlight = Locked(RefreshFlight())
    /// Whether a batch of this link failed on any lane: its queue pair is in the error
    /// state (RC), and the memory node is out of reach for this incarnation (fenced,
    /// dead, or the link broke; reconnecting is not done yet). The owner stops using the
    /// link, its lease there lapses, and recovery settles the logs it left pending.
    private let brokenFlag = ManagedAtomic<Bool>(false)
    /// Invariant checks so far (debug builds; `checkInvariants`).
    private let invariantChecks = ManagedAtomic<UInt64>(0)

    private init(
        index: Int, grant: MemoryNodeGrant, connection: any FabricConnection, owner: OwnerID, incarnation: UInt16,
        sections: [UInt64], cacheShards: Int
    ) {
        self.index = index
        self.grant = grant
        self.connection = connection
        self.owner = owner
        self.incarnation = incarnation
        cache = HeaderCacheShards(sections: sections, shards: cacheShards, start: HeaderCacheShards.start(of: owner))
        var lanes = [connection]
        if cache.count > 1 {
            while lanes.count < cache.count + 1, let sibling = connection.sibling() { lanes.append(sibling) }
        }
        self.lanes = lanes
        leaseWord = Locked(NodeSlot(heartbeat: 0, state: .alive, incarnation: incarnation).rawValue)
    }

    /// Attaches `owner` to a memory node: reads its superblock, the owner's node-table
    /// slot and every section header in one doorbell, checks the superblock against the
    /// grant, and takes the slot (free to alive, with the next incarnation) by CAS. The
    /// cache has `cacheShards` shards (fewer on a small pool).
    static func attach(
        index: Int, grant: MemoryNodeGrant, connection: any FabricConnection, owner: OwnerID, cacheShards: Int = 1
    ) async throws(AttachError) -> MemoryNodeLink {
        let geometry = grant.geometry
        guard grant.endAddress.rawValue <= RemotePointer.addressMask else {
            throw .layout(.addressBeyondPointerRange(grant.endAddress))
        }
        let first: [VerbResult]
        do {
            first = try await connection.post([
                .readWords(grant.baseAddress, count: 8, rkey: grant.metadataKey),
                .readWords(grant.nodeSlotAddress(owner), count: 1, rkey: grant.metadataKey),
                .readWords(grant.address(of: .section(0)), count: geometry.sectionCount, rkey: grant.metadataKey),
            ])
        } catch { throw .fabric(error) }
        let superblock: Superblock
        do { superblock = try Superblock(words: first[0].words) } catch { throw .layout(error) }
        guard superblock.geometry == geometry else {
            throw .layout(.superblockMismatch("pool of \(superblock.geometry.sectionCount) sections, grant says \(geometry.sectionCount)"))
        }
        let slotWord = first[1].words[0]
        guard let registered = NodeSlot(rawValue: slotWord)?.registering() else { throw .slotTaken }
        let link = MemoryNodeLink(
            index: index, grant: grant, connection: connection, owner: owner, incarnation: registered.incarnation,
            sections: first[2].words, cacheShards: cacheShards)
        var trace = OperationTrace()
        let outcome: UpdateOutcome<NodeSlot>
        do {
            outcome = try await link.update(
                .word(grant.nodeSlotAddress(owner), known: slotWord), UpdatePolicy(attemptsMax: 1), trace: &trace
            ) { $0.registering() }
        } catch { throw .fabric(error) }
        guard case .updated(let slot) = outcome, slot == registered else { throw .slotTaken }
        return link
    }

    /// A link that acts in the name of compute node `owner`, which is fenced, for its
    /// recovery: no attach (the slot is the dead node's), an empty cache that recovery's
    /// reads fill, no pending logs of its own.
    static func acting(for owner: OwnerID, incarnation: UInt16, grant: MemoryNodeGrant, connection: any FabricConnection) -> MemoryNodeLink {
        MemoryNodeLink(
            index: 0, grant: grant, connection: connection, owner: owner, incarnation: incarnation,
            sections: Array(repeating: SectionHeader.empty.rawValue, count: grant.geometry.sectionCount), cacheShards: 1)
    }

    /// How many connections the link posts on: one per cache shard and one for the
    /// upkeep when the backend opens more (and the cache has more than one shard), else 1.
    var laneCount: Int { lanes.count }

    var geometry: PoolGeometry { grant.geometry }
    var memoryNode: NodeID { grant.memoryNode }
    var metadataKey: RKey { grant.metadataKey }

    /// The connection that the operation of `trace` posts on.
    @inline(__always)
    func connection(for trace: OperationTrace) -> any FabricConnection { connection(lane: trace.lane) }

    /// The connection of `lane`: the upkeep's (`OperationTrace.upkeepLane`), or a task's
    /// (any other number: they wrap around the others).
    @inline(__always)
    func connection(lane: Int) -> any FabricConnection {
        guard lanes.count > 1 else { return connection }
        return lane < 0 ? lanes[lanes.count - 1] : lanes[lane % (lanes.count - 1)]
    }

    /// Posts `verbs` as one batch, counting it in `trace`.
    func post(_ verbs: [Verb], trace: inout OperationTrace) async throws(FabricError) -> [VerbResult] {
        try await postTicketed(verbs, trace: &trace).results
    }

    /// Posts `verbs` as one batch and answers its results with the batch's ticket. The
    /// ticket is drawn right before the batch is posted: batches of one connection
    /// execute in posting order, so a later ticket usually carries newer answers. Not
    /// always: two tasks of a node may draw their tickets in one order and post in the
    /// other (with real threads, and in virtual time too when the runtime suspends a task
    /// between the two), and batches on different lanes (`connection(for:)`) keep no order
    /// at all, which leaves the cache staler, never wrong. The cache is a hint: a decision
    /// to change a word rests on a CAS, a decision not to on a fresh READ
    /// (`rereadOnRefusal`; found by `fuzz-recovery`: a flush skipped on a stale word), and
    /// the answer that the pool is full on a full refresh, stored whole (`storeAll`).
    /// (One counter for the lanes of a link: with a queue pair each, the tasks of a node
    /// no longer fell into step over it; the monotonic clock cost more per batch.)
    func postTicketed(_ verbs: [Verb], trace: inout OperationTrace) async throws(FabricError) -> (results: [VerbResult], ticket: UInt64) {
        trace.batches += 1
        trace.verbs += UInt64(verbs.count)
        let ticket = drawTicket()
        do {
            return (try await connection(for: trace).post(verbs), ticket)
        } catch {
            markBroken()
            throw error
        }
    }

    /// Whether a batch of this link failed (see `brokenFlag`).
    var isBroken: Bool { brokenFlag.load(ordering: .relaxed) }

    /// Full reads begun on this link so far (`refresh(beginningAfter:)`).
    var refreshesStarted: UInt64 { refreshFlight.withLock { $0.started } }

    /// A batch of this link failed: the link is out of reach from now on.
    func markBroken() { brokenFlag.store(true, ordering: .relaxed) }

    /// The ticket of a batch about to be posted (see `postTicketed`).
    func drawTicket() -> UInt64 { nextTicket.wrappingIncrementThenLoad(ordering: .relaxed) }

    /// The READ of one header word.
    func read(_ slot: HeaderSlot) -> Verb { .readWords(grant.address(of: slot), count: 1, rkey: metadataKey) }

    /// The READ of the span headers of `sections`.
    func spanRead(sections: Range<Int>) -> Verb {
        .readWords(grant.address(of: .span(section: sections.lowerBound, span: 0)), count: sections.count * PoolGeometry.spansPerSection, rkey: metadataKey)
    }

    /// Reads every section header, and the span headers of every section not held whole,
    /// into the cache (one doorbell, or two when the fresh section words show chunk mode
    /// where the cache did not: `FullRead`), and answers the words read; or, when another
    /// task of this compute node is already doing so, waits for that read and answers its
    /// words: one full read per memory node at a time, however many tasks run out of room
    /// together (no refresh storm near a full pool).
    ///
    /// A shared read may have begun before this call did: the caller's operation must not
    /// conclude from it alone. The search never does: its answer that the pool is full
    /// rests on two reads (`BlockAllocator.noRoomInCache`), and as reads run one at a time,
    /// the second of them begins after the first ended, during the call. A shared read
    /// that failed is no answer: the task reads itself. With `beginningAfter` (a count of
    /// `refreshesStarted` taken earlier), only a read begun after that many is shared: a
    /// read in flight that began before is outlasted, not taken. The waits are bounded by
    /// the reads they wait for (each completes or fails), the steps by
    /// `refreshAttemptsMax`.
    @discardableResult
    package func refresh(
        beginningAfter earliest: UInt64? = nil, trace: inout OperationTrace, runtime: any Runtime, pauseNanos: ClosedRange<UInt64>
    ) async throws(FabricError) -> FullRead {
        var lastFailure: FabricError?
        for _ in 0..<Self.refreshAttemptsMax {
            let step = refreshFlight.withLock { flight -> RefreshFlight.Step in
                if let generation = flight.inFlight {
                    return generation > (earliest ?? 0) ? .join(generation) : .outlast(generation)
                }
                flight.started += 1
                flight.inFlight = flight.started
                return .lead(flight.started)
            }
            switch step {
            case .lead(let generation):
                return try await leadRefresh(generation, trace: &trace)
            case .join(let generation), .outlast(let generation):
                var pause = Pause(pauseNanos)
                while refreshFlight.withLock({ $0.finished < generation }) { await pause.sleep(on: runtime) }
                guard case .join = step else { continue }
                // Reads finish in order, one at a time: the last one finished is the one
                // joined or a later one.
                switch refreshFlight.withLock({ $0.outcome }) {
                case .success(let read)?:
                    trace.refreshesShared += 1
                    return read
                case .failure(let error)?:
                    lastFailure = error
                case nil:
                    preconditionFailure("a finished refresh left no outcome")
                }
            }
        }
        throw lastFailure ?? .connectionBroken(memoryNode)
    }

    /// Most steps of one `refresh`: a read outlasted, shared reads that failed, before the
    /// last failure is answered. Each step waits for one read.
    static let refreshAttemptsMax = 4

    /// The full read of refresh `generation`, stored in the cache and kept as the flight's
    /// outcome for the tasks that joined it.
    private func leadRefresh(_ generation: UInt64, trace: inout OperationTrace) async throws(FabricError) -> FullRead {
        var outcome: Result<FullRead, FabricError> = .failure(.connectionBroken(memoryNode))
        defer {
            refreshFlight.withLock { flight in
                precondition(flight.inFlight == generation, "refresh \(generation) ended while \(String(describing: flight.inFlight)) was in flight")
                flight.inFlight = nil
                flight.finished = generation
                flight.outcome = outcome
            }
        }
        trace.refreshes += 1
        let sectionCount = geometry.sectionCount
        let spansPerSection = PoolGeometry.spansPerSection
        // The span words of the sections the cache does not show held whole ride in the
        // first doorbell (those in chunk mode for the rules of `FullRead`, those with an
        // empty span for the searches: opening a span expects its current word); those of
        // sections the fresh words show in chunk mode and the cache held whole, in a second.
        var cachedNotWhole = Array(repeating: false, count: sectionCount)
        cache.forEachShard { shard in
            for section in shard.sectionRange { cachedNotWhole[section] = SectionHeader(rawValue: shard[.section(section)])?.isAllWhole != true }
        }
        let early = FullRead.spanRanges(of: cachedNotWhole)
        var verbs: [Verb] = [.readWords(grant.address(of: .section(0)), count: sectionCount, rkey: metadataKey)]
        verbs += early.map { spanRead(sections: $0) }
        verbs += [
            .readWords(grant.roomSummaryAddress(word: 0), count: RoomSummary.wordCount(sections: sectionCount), rkey: metadataKey),
            .readWords(grant.roomSummaryTopAddress(word: 0), count: RoomSummary.topWordCount(sections: sectionCount), rkey: metadataKey),
        ]
        var spans = Array(repeating: FullRead.unreadSpan, count: geometry.spanCount)
        var spansRead = Array(repeating: false, count: sectionCount)
        func store(_ ranges: [Range<Int>], _ results: ArraySlice<VerbResult>) {
            for (range, result) in zip(ranges, results) {
                spans.replaceSubrange(range.lowerBound * spansPerSection..<range.upperBound * spansPerSection, with: result.words)
                for section in range { spansRead[section] = true }
            }
        }
        let sections: [UInt64]
        let summaryWords: [UInt64]
        let summaryTops: [UInt64]
        let ticket: UInt64
        do {
            let (results, firstTicket) = try await postTicketed(verbs, trace: &trace)
            (sections, summaryWords, summaryTops, ticket) = (results[0].words, results[early.count + 1].words, results[early.count + 2].words, firstTicket)
            store(early, results[1..<early.count + 1])
            let late = FullRead.spanRanges(of: sections.indices.map { !spansRead[$0] && SectionHeader.hasChunkModeEntry(sections[$0]) })
            if !late.isEmpty {
                let lateVerbs = late.map { spanRead(sections: $0) }
                verbs += lateVerbs
                store(late, try await post(lateVerbs, trace: &trace)[...])
            }
        } catch {
            outcome = .failure(error)
            throw error
        }
        trace.refreshBytes += verbs.reduce(0) { $0 + UInt64($1.payloadBytes) }
        let read = FullRead(sections: sections, spans: spans, spansRead: spansRead)
        cache.forEachShard { $0.storeAll(read, ticket: ticket) }
        if let stale = RoomSummary.staleSections(sections: read.sections, words: summaryWords, topWords: summaryTops) {
            roomChanged(stale, trace: &trace)
        }
        outcome = .success(read)
        return read
    }

    /// The room summary bits of `sections` must be synced: left in `trace` for the
    /// caller (`LinkEffects.roomChanged`). A caller that drops it leaves the bits stale
    /// (the summary is a hint, and the next full refresh finds them stale).
    func roomChanged(_ sections: Range<Int>, trace: inout OperationTrace) { trace.effects.noteRoomChanged(sections) }

    /// Reads header words into the cache (one doorbell).
    func readHeaders(_ slots: [HeaderSlot], trace: inout OperationTrace) async throws(FabricError) {
        let (results, ticket) = try await postTicketed(slots.map(read), trace: &trace)
        store(results.map { $0.words[0] }, at: slots, ticket: ticket)
    }

    /// Stores answers of the batch with `ticket` into the cache (newer answers win).
    func store(_ words: [UInt64], at slots: [HeaderSlot], ticket: UInt64) {
        guard !slots.isEmpty else { return }
        for (slot, word) in zip(slots, words) { cache.withShard(of: slot) { $0.store(word, at: slot, ticket: ticket) } }
    }

    /// Reads every section header word (one READ of 8 bytes per section), leaving the
    /// cache as it is (`BlockAllocator.allocateSections` says why).
    func readSectionWords(trace: inout OperationTrace) async throws(FabricError) -> [UInt64] {
        let sectionCount = geometry.sectionCount
        trace.refreshBytes += UInt64(8 * sectionCount)
        return try await post([.readWords(grant.address(of: .section(0)), count: sectionCount, rkey: metadataKey)], trace: &trace)[0].words
    }

    /// Reads the span headers of `section` into the cache.
    func readSpans(of section: Int, trace: inout OperationTrace) async throws(FabricError) {
        let (results, ticket) = try await postTicketed([
            .readWords(grant.address(of: .span(section: section, span: 0)), count: PoolGeometry.spansPerSection, rkey: metadataKey)
        ], trace: &trace)
        let words = results[0].words
        cache.withShard(of: .section(section)) { $0.storeSpans(of: section, words, ticket: ticket) }
    }

    /// An operation gave back this node's log on `slot`, undone: left in `trace` for the
    /// caller, who must have it flushed (`LinkEffects.returnedLogs`).
    func logReturned(_ slot: HeaderSlot, trace: inout OperationTrace) { trace.effects.returnedLogs.append(slot) }

    /// Checks the cache's invariants after an operation (debug builds): the summary bits
    /// of every section whose words changed since the last check; the whole pending table
    /// and the busy marks every `invariantCheckPeriod`-th check (a walk of every slot of
    /// every shard after each operation made a debug build some ten times slower).
    func checkInvariants() {
        debugOnly {
            let whole = invariantChecks.wrappingIncrementThenLoad(ordering: .relaxed) % Self.invariantCheckPeriod == 0
            cache.forEachShard { cache in
                cache.checkInvariants(tables: whole)
                if whole { cache.pending.checkInvariants(owner: owner) }
            }
        }
    }

    /// Checks between two whole checks of the pending tables (`checkInvariants`).
    static let invariantCheckPeriod: UInt64 = 16

    /// Marks `slot` busy for this node's CAS; false when another task of the node holds it
    /// or other nodes have their turn on it (`BusyHeaders.insertOutsideTurn`).
    func tryAcquireOutsideTurn(_ slot: HeaderSlot, now: UInt64) -> Bool {
        cache.withShard(of: slot) { $0.busy.insertOutsideTurn(slot, now: now) }
    }

    func releaseBusy(_ slot: HeaderSlot) { cache.withShard(of: slot) { $0.busy.remove(slot) } }
}

/// Every section and span header word of a memory node, as one full refresh read them
/// (`MemoryNodeLink.refresh`). Two reads with equal words (or equal but for bits that
/// never add room: `showsSameAllocations`), the second posted after the first completed,
/// show the pool with no room for a request at an instant between them when their words
/// show none: each word held its value from its first READ to its
/// second, unless it changed and came back. Words come back exactly after hints, a
/// rolled-back claim, or a span closed and opened again; for room to hide between two
/// equal reads, a header that held room in between must come back to a word without
/// it, and room is taken by a block operation, which changes the header's log sequence
/// (6 bits): 64 commits on one header between two reads of it.
///
/// A span word counts only under a chunk-mode entry (`hasRoom`, `noRoomThroughout`), and a
/// search needs the span words of the sections with an empty span too (opening one
/// expects its current word), so a full read reads the span words of every section not
/// held whole and of no other: of a pool held in whole sections, 4 KiB of section words
/// per GiB instead of 68 KiB with the span words. The span words of a section the cache
/// showed held whole and the read shows in chunk mode are read in a second doorbell,
/// after the section word, still during the read: each word is still read between the
/// read's start and its end, which is all `noRoomThroughout` asks. (Those of a section
/// that went from whole to empty spans are not: an open there may lose its first CAS.)
package struct FullRead: Sendable, Equatable {
    let sections: [UInt64]
    /// The pool's span words; `unreadSpan` in each span of a section not in `spansRead`.
    let spans: [UInt64]
    /// Whether the span words of each section were read: every section whose word has a
    /// chunk-mode entry, and others.
    let spansRead: [Bool]

    init(sections: [UInt64], spans: [UInt64], spansRead: [Bool]? = nil) {
        let spansRead = spansRead ?? Array(repeating: true, count: sections.count)
        precondition(spans.count == sections.count * PoolGeometry.spansPerSection && spansRead.count == sections.count,
                     "a full read of \(sections.count) sections")
        precondition(sections.indices.allSatisfy { spansRead[$0] || !SectionHeader.hasChunkModeEntry(sections[$0]) },
                     "a full read lacks the span words of a chunk-mode section")
        self.sections = sections
        self.spans = spans
        self.spansRead = spansRead
    }

    /// What a span word not read holds: no valid span header (its size code is 7).
    static let unreadSpan = UInt64.max

    /// The sections marked in `needed`, as ranges to read in one verb each: ranges less
    /// than `spanRangeGapMax` sections apart are read as one, and at most
    /// `spanRangesMax` ranges (more become one range from the first to the last).
    static func spanRanges(of needed: [Bool]) -> [Range<Int>] {
        var ranges: [Range<Int>] = []
        for section in needed.indices where needed[section] {
            if let last = ranges.last, section - last.upperBound < spanRangeGapMax {
                ranges[ranges.count - 1] = last.lowerBound..<section + 1
            } else {
                ranges.append(section..<section + 1)
            }
        }
        guard ranges.count > spanRangesMax else { return ranges }
        return [ranges.first!.lowerBound..<ranges.last!.upperBound]
    }

    /// A gap of this many sections' span words (1 KiB) costs about what another verb does.
    static let spanRangeGapMax = 8
    static let spanRangesMax = 32
}

/// The full refreshes of a link: generations numbered from 1, one in flight at a time.
private struct RefreshFlight: Sendable {
    /// Generations started, and the one in flight.
    var started: UInt64 = 0
    var inFlight: UInt64?
    /// The last generation finished, and its outcome.
    var finished: UInt64 = 0
    var outcome: Result<FullRead, FabricError>?

    /// What a task asking for a refresh does next.
    enum Step {
        /// Read: no refresh is in flight.
        case lead(UInt64)
        /// Wait for this refresh and take its words.
        case join(UInt64)
        /// Wait for this refresh, begun too early to be shared, to end; then look again.
        case outlast(UInt64)
    }
}
