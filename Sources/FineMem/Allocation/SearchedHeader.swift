/// A header that the allocation protocol searches and commits blocks on with one CAS: a
/// span header (the chunk layer: blocks of 1-16 chunks) or a section header (the section
/// layer: blocks of 1-16 spans). Everything else about a layer (where its header is, which
/// transitions claim and release a run) comes from `BlockHeader`; the protocol over both
/// (`allocate(in:)`, `free(_:in:)`) is written once.
protocol SearchedHeader: BlockHeader {
    /// Picks where to claim a run of `2^countLog2` units, from the cache; marks the chosen
    /// header busy.
    static func choose(countLog2: Int, cache: inout HeaderCache, link: MemoryNodeLink) -> HeaderChoice?
    /// Where the next search starts after a claim on `slot` committed.
    static func claimCommitted(on slot: HeaderSlot, cache: inout HeaderCache)
}

extension SpanHeader: SearchedHeader {
    static func choose(countLog2: Int, cache: inout HeaderCache, link: MemoryNodeLink) -> HeaderChoice? {
        chooseSpan(chunkCountLog2: countLog2, cache: &cache, link: link)
    }

    /// The span search moved the cursor when it chose a normal span: a claim on a span it
    /// had to avoid leaves the cursor where it was.
    static func claimCommitted(on slot: HeaderSlot, cache: inout HeaderCache) {}
}

extension SectionHeader: SearchedHeader {
    static func choose(countLog2: Int, cache: inout HeaderCache, link: MemoryNodeLink) -> HeaderChoice? {
        chooseSection(spanCountLog2: countLog2, cache: &cache, link: link)
    }

    static func claimCommitted(on slot: HeaderSlot, cache: inout HeaderCache) { cache.cursor = slot.section }
}

extension MemoryNodeLink {
    /// Where to claim `2^countLog2` units of `Header`'s layer: the search of the shard
    /// `home` first, then of the others in turn. A claim or an open (its header marked
    /// busy) ends it, and with `readsAtHomeFirst`, so does the home shard's answer to read
    /// the span headers of an uncached section: the other shards' room belongs to other
    /// tasks, and a span this node opened at home leaves the rest of its section uncached,
    /// so that answer comes right after every open (when a claim elsewhere outranked it,
    /// the section was never read, and the task allocated in another task's shard for
    /// good: two tasks on two CPUs then shared a shard lock and its spans). The caller
    /// bounds those reads per operation (`homeReadsMax`): a home shard full of other
    /// nodes' spans would otherwise cost a round trip per section before the first claim
    /// elsewhere. The shards' other answers rank as within one search (`chooseSpan`): read
    /// the span headers of an uncached section, else wait for this node's CAS in flight,
    /// else recheck a header; nil when no shard shows room. Turns of other nodes whose
    /// time is up (`runtime`'s clock) end first.
    func choose<Header: SearchedHeader>(
        _ type: Header.Type, countLog2: Int, home: Int, readsAtHomeFirst: Bool = true, runtime: any Runtime
    ) -> HeaderChoice? {
        var other: HeaderChoice?
        for offset in 0..<cache.count {
            let choice = cache.withShard((home + offset) % cache.count) { cache in
                if cache.busy.hasTurns { cache.busy.endTurns(through: runtime.nowNanoseconds) }
                return Header.choose(countLog2: countLog2, cache: &cache, link: self)
            }
            switch choice {
            case .claim?, .open?: return choice
            case .readSpans? where offset == 0 && readsAtHomeFirst: return choice
            case nil: continue
            case let answer?: if other.map({ Self.rank(answer) > Self.rank($0) }) ?? true { other = answer }
            }
        }
        return other
    }

    /// The rank of a search's answer (higher first), as `chooseSpan` orders them.
    private static func rank(_ choice: HeaderChoice) -> Int {
        switch choice {
        case .claim, .open: 4
        case .readSpans: 3
        case .wait: 2
        case .recheck: 1
        }
    }
}

extension BlockAllocator {
    /// Allocates `2^chunkCountLog2` chunks on `link` in `layer`; nil when the node has no
    /// room, with `noRoomRead` the full read that says so. Each choice of the search gets one commit CAS; a lost one refreshes the cache
    /// from its answer and the search chooses again (see `Search` for the bounds).
    func allocate<Header: SearchedHeader>(
        in layer: Header.Type, chunkCountLog2: Int, application: ApplicationID, on link: MemoryNodeLink, noRoomRead: inout FullRead?,
        trace: inout OperationTrace
    ) async throws(AllocationError) -> Block? {
        let countLog2 = chunkCountLog2 - Header.unitChunkCountLog2
        var search = Search(configuration, chunkCountLog2: chunkCountLog2, sectionCount: link.geometry.sectionCount)
        var failures = LostCASCounts()
        let home = Int(application.rawValue) % link.cache.count
        var readsAtHome = 0
        for _ in 0..<search.roundsMax {
            try await beginRound(&search, on: link, trace: &trace)
            let choice = link.choose(Header.self, countLog2: countLog2, home: home, readsAtHomeFirst: readsAtHome < Self.homeReadsMax, runtime: runtime)
            if case .readSpans(let section) = choice, link.cache.shard(of: section) == home { readsAtHome += 1 }
            switch choice {
            case nil:
                if try await follow(.noRoom, &search, on: link, trace: &trace) {
                    noRoomRead = search.lastRead
                    return nil
                }
            case .wait:
                _ = try await follow(.wait, &search, on: link, trace: &trace)
            case .recheck(let slots):
                _ = try await follow(.recheck(slots), &search, on: link, trace: &trace)
            case .readSpans(let section):
                do { try await link.readSpans(of: section, trace: &trace) } catch { throw .fabric(error) }
            case .open(let section, let span):
                defer { link.releaseBusy(.section(section)) }
                if let block = try await openSpan(section: section, span: span, chunkCountLog2: chunkCountLog2, application: application, on: link, trace: &trace) {
                    return block
                }
                trace.attempts += 1
            case .claim(let slot, let run):
                precondition(run.countLog2 == countLog2, "the search chose \(run) for 2^\(countLog2) units")
                var busy = true
                defer { if busy { link.releaseBusy(slot) } }
                let failed = failures[slot]
                let block = Header.block(at: run, of: slot, on: link.memoryNode)
                let outcome: UpdateOutcome<Header> = try await update(
                    slot, UpdatePolicy(attemptsMax: 1, log: .commit(record: link.grant.recordAddress(chunk: block.firstChunk))), on: link, trace: &trace
                ) { header in
                    header.claiming(run, owner: owner).map { markingContention($0, failures: failed) }
                }
                switch outcome {
                case .committed(let header, let recordBefore):
                    busy = false
                    committed(header, on: slot, block: block, allocated: true, application: application, recordBefore: recordBefore, link: link) { cache in
                        Header.claimCommitted(on: slot, cache: &cache)
                        cache.busy.remove(slot)
                    }
                    return block
                case .lost(let current):
                    failures.count(slot)
                    try await lost(toPendingLog: Header(rawValue: current)?.logPending ?? false, backoff: &search.backoff, trace: &trace)
                case .refused:
                    trace.attempts += 1
                case .updated:
                    preconditionFailure("a block operation answers committed")
                }
            }
        }
        throw .retryLimitExceeded(attempts: search.roundsMax)
    }

    /// What a search's choice was when it found nothing to claim, whatever it looks for
    /// (a span's chunks, a section's spans, a run of sections).
    enum SearchStall {
        /// The cache shows no room.
        case noRoom
        /// Every candidate has a CAS of this node in flight.
        case wait
        /// The only room is in the middle of someone else's operation: read these again.
        case recheck([HeaderSlot])
    }

    /// Follows a search round that found nothing to claim: no room in the cache is looked
    /// into (`noRoomInCache`: answers true when the pool has no room, proven), a wait
    /// pauses, a recheck pauses and reads the headers again (an attempt). Answers false
    /// when the search goes on.
    func follow(_ stall: SearchStall, _ search: inout Search, on link: MemoryNodeLink, trace: inout OperationTrace) async throws(AllocationError) -> Bool {
        switch stall {
        case .noRoom:
            return try await noRoomInCache(&search, on: link, trace: &trace)
        case .wait:
            try await search.backoff.pause(runtime)
        case .recheck(let slots):
            trace.attempts += 1
            try await search.backoff.pause(runtime)
            do { try await link.readHeaders(slots, trace: &trace) } catch { throw .fabric(error) }
        }
        return false
    }

    /// Most reads of uncached span headers in its home shard that one allocation makes
    /// before room in another shard may win (`MemoryNodeLink.choose`).
    static let homeReadsMax = 2

    /// Frees `block`, committed on a header of type `Header`: one CAS on that header.
    func free<Header: BlockHeader>(
        _ block: Block, in layer: Header.Type, application: ApplicationID, on link: MemoryNodeLink, trace: inout OperationTrace
    ) async throws(AllocationError) {
        let slot = HeaderSlot(committing: block)
        let run = Header.run(of: block)
        var backoff = Backoff(configuration)
        try await acquireBusy(slot, on: link, backoff: &backoff)
        var busy = true
        defer { if busy { link.releaseBusy(slot) } }
        while trace.attempts < configuration.operationAttemptsMax {
            let outcome: UpdateOutcome<Header> = try await update(
                slot, UpdatePolicy(attemptsMax: 1, log: .commit(record: link.grant.recordAddress(chunk: block.firstChunk)), rereadOnRefusal: true),
                on: link, trace: &trace
            ) { $0.releasing(run, owner: owner) }
            switch outcome {
            case .committed(let header, let recordBefore):
                busy = false
                committed(header, on: slot, block: block, allocated: false, application: application, recordBefore: recordBefore, link: link) {
                    $0.busy.remove(slot)
                }
                return
            case .updated:
                preconditionFailure("a block operation answers committed")
            case .lost(let current):
                try await lost(toPendingLog: Header(rawValue: current)?.logPending ?? false, backoff: &backoff, trace: &trace)
            case .refused(let current):
                throw .corruptMetadata("\(slot) does not hold \(block): \(Header(rawValue: current).map { "\($0)" } ?? "invalid word")")
            }
        }
        throw .retryLimitExceeded(attempts: trace.attempts)
    }

    /// After a block operation's commit: checks its postcondition (the header's log is
    /// pending, names this node, and the block's run is marked as the operation left it),
    /// records the pending log (and does `also` to the cache in the same critical section),
    /// and starts the upkeep (flush; for a span, close or hint).
    func committed<Header: BlockHeader>(
        _ header: Header, on slot: HeaderSlot, block: Block, allocated: Bool, application: ApplicationID, recordBefore: UInt64,
        link: MemoryNodeLink, also: (inout HeaderCache) -> Void = { _ in }
    ) {
        let run = Header.run(of: block)
        precondition(allocated ? header.marksAllocated(run) : header.marksFree(run),
                     "the commit on \(slot) does not mark \(block) \(allocated ? "allocated" : "free"): \(header)")
        precondition(header.log.run == run, "the commit on \(slot) logged \(header.log.run), not \(run)")
        if !allocated {
            let ownRecord = FullLogRecord(rawValue: recordBefore)
            precondition(ownRecord?.isAllocated == true && ownRecord?.owner == owner && ownRecord?.chunkCountLog2 == block.chunkCountLog2,
                         "freeing \(block), whose record says \(ownRecord.map { "\($0)" } ?? "an invalid word")")
        }
        if let serial = link.logCommitted(header, on: slot, block: block, allocated: allocated, application: application, recordBefore: recordBefore, also: also) {
            queueUpkeep(of: slot, serial: serial, on: link)
        }
    }

    /// `link.update` on a header, with a fabric error as an allocation error and its
    /// effects taken.
    func update<Header: LoggedHeader>(
        _ slot: HeaderSlot, _ policy: UpdatePolicy, on link: MemoryNodeLink, alsoRead: [HeaderSlot] = [],
        trace: inout OperationTrace, _ transition: (Header) -> Header?
    ) async throws(AllocationError) -> UpdateOutcome<Header> {
        defer { takeEffects(of: &trace, on: link) }
        do { return try await link.update(.header(slot), policy, alsoRead: alsoRead, trace: &trace, transition) } catch { throw .fabric(error) }
    }

    /// `header` with its contention mark set or cleared after `failures` lost CASes.
    func markingContention<Header: LoggedHeader>(_ header: Header, failures: Int) -> Header {
        if failures >= configuration.contentionHigh, !header.contended { return header.with(contended: true) }
        if failures <= configuration.contentionLow, header.contended { return header.with(contended: false) }
        return header
    }
}

/// Lost CASes per header within one operation, for the contention mark: the last few
/// headers the operation lost on, stored inline (no heap allocation). A header pushed out
/// by newer ones starts again from zero, which only delays its mark.
struct LostCASCounts {
    private var slots = InlineArray<4, HeaderSlot?>(repeating: nil)
    private var counts = InlineArray<4, Int>(repeating: 0)
    private var next = 0

    subscript(slot: HeaderSlot) -> Int {
        for index in slots.indices where slots[index] == slot { return counts[index] }
        return 0
    }

    mutating func count(_ slot: HeaderSlot) {
        for index in slots.indices where slots[index] == slot {
            counts[index] += 1
            return
        }
        slots[next] = slot
        counts[next] = 1
        next = (next + 1) % slots.count
    }
}
