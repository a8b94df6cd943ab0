/// Blocks over 2 MiB: aligned runs of whole sections.
///
/// A claim writes the intent record (kind claim, the run, owner, application) and sends
/// one CAS per section in one doorbell; if any CAS loses, the claimed sections are rolled
/// back to exactly the words they had and the intent is cleared, in one more doorbell. A
/// release writes a release intent with its first CASes and rolls forward until every
/// section is released. Either way, once every section is committed the block's record
/// is written and each section's pending bit cleared in one doorbell, and the intent is
/// cleared last (`MemoryNodeLink.flushRun`). Between any two of these verbs the intent
/// record names the node in the middle of the operation.
extension BlockAllocator {
    /// Takes a free intent slot of this node, waiting (bounded) while all are busy.
    private func takeIntentSlot() async throws(AllocationError) -> Int {
        var backoff = Backoff(configuration)
        for _ in 0...configuration.waitCountMax {
            if let slot = freeIntentSlots.withLock({ $0.popLast() }) { return slot }
            do { try await backoff.pause(runtime) } catch { break }
        }
        throw .intentSlotsBusy
    }

    /// Allocates `2^chunkCountLog2` chunks (more than one section) as an aligned run of
    /// whole sections; nil when the node has no such run, with `noRoomRead` the full read
    /// that says so (nil when the pool is smaller than the run).
    func allocateSections(
        chunkCountLog2: Int, application: ApplicationID, on link: MemoryNodeLink, noRoomRead: inout FullRead?, trace: inout OperationTrace
    ) async throws(AllocationError) -> Block? {
        let sectionCountLog2 = chunkCountLog2 - Block.sectionLayerCountLog2Max
        let sectionCount = 1 << sectionCountLog2
        guard sectionCount <= link.geometry.sectionCount else { return nil }
        let intentSlot = try await takeIntentSlot()
        var intentSlotHandedOver = false
        defer { if !intentSlotHandedOver { freeIntentSlots.withLock { $0.append(intentSlot) } } }
        var search = Search(configuration, chunkCountLog2: chunkCountLog2, sectionCount: link.geometry.sectionCount)
        // The room summary tells where a chunk may be found, not where whole sections are
        // empty: a run of sections goes straight to the full refresh.
        search.lookedInSummary = true
        // After a claim that lost or found its words stale, the next choice is made on the
        // section words read right after it: every node takes large blocks from the top,
        // so a node whose cache is stale there would likely lose the next runs too, a
        // round trip and a rollback each. The cache is left as it was: a section another
        // node uses in part would draw this node's small blocks there (searches open spans
        // in sections in use first), and contend.
        var lastRead: [UInt64]?
        for _ in 0..<search.roundsMax {
            try await beginRound(&search, on: link, trace: &trace)
            // Only for the choice right after the read: any other step reads anew.
            let fresh = lastRead
            lastRead = nil
            let now = runtime.nowNanoseconds
            let spread = Self.runSpread(owner: owner, application: application, retries: trace.retries)
            let choice = link.cache.withEveryShardLocked { cache in
                cache.endTurns(through: now)
                return chooseRun(count: sectionCount, spread: spread, sectionWords: fresh, cache: &cache)
            }
            let sections: Range<Int>
            switch choice {
            case nil:
                if try await follow(.noRoom, &search, on: link, trace: &trace) {
                    noRoomRead = search.lastRead
                    return nil
                }
                continue
            case .wait:
                _ = try await follow(.wait, &search, on: link, trace: &trace)
                continue
            case .recheck(let slots):
                _ = try await follow(.recheck(slots), &search, on: link, trace: &trace)
                continue
            case .claim(let chosen):
                sections = chosen
            }
            let slots = sections.map(HeaderSlot.section)
            defer { for slot in slots { link.releaseBusy(slot) } }
            let claim = try await claimSections(
                sections, known: fresh.map { Array($0[sections]) }, chunkCountLog2: chunkCountLog2, application: application, intentSlot: intentSlot,
                on: link, trace: &trace)
            switch claim {
            case .claimed(let block):
                intentSlotHandedOver = true
                return block
            case .stale:
                trace.attempts += 1
            case .lost(let toPendingLog):
                try await lost(toPendingLog: toPendingLog, backoff: &search.backoff, trace: &trace)
            }
            do { lastRead = try await link.readSectionWords(trace: &trace) } catch { throw .fabric(error) }
        }
        throw .retryLimitExceeded(attempts: search.roundsMax)
    }

    /// Which of the free runs from the top a search for whole sections takes
    /// (`chooseRun`): each node and application its own among the first few, and another
    /// after each lost CAS.
    static func runSpread(owner: OwnerID, application: ApplicationID, retries: UInt64) -> UInt64 {
        ((UInt64(owner.rawValue) &* 0x9E37_79B9_7F4A_7C15 ^ UInt64(application.rawValue) &* 0xBF58_476D_1CE4_E5B9)
            &+ retries &* 0x94D0_49BB_1331_11EB) >> 17
    }

    /// What one claim of a run of sections came to.
    private enum SectionsClaim {
        /// Every section committed: the block, whose flush is queued (it holds the intent
        /// slot until the flush is done).
        case claimed(Block)
        /// The cache was stale: nothing was sent.
        case stale
        /// A CAS lost (to a pending log, or not): the claimed sections are rolled back.
        case lost(toPendingLog: Bool)
    }

    /// Claims `sections` (marked busy by the caller) for one block: the intent and a CAS
    /// per section in one doorbell; rolls back what it claimed if any CAS lost.
    private func claimSections(
        _ sections: Range<Int>, known: [UInt64]?, chunkCountLog2: Int, application: ApplicationID, intentSlot: Int, on link: MemoryNodeLink,
        trace: inout OperationTrace
    ) async throws(AllocationError) -> SectionsClaim {
        let slots = sections.map(HeaderSlot.section)
        let intent = IntentRecord(
            kind: .claim, firstSection: sections.lowerBound, sectionCountLog2: chunkCountLog2 - Block.sectionLayerCountLog2Max, owner: owner,
            application: application)
        let block = Block(memoryNode: link.memoryNode, firstChunk: sections.lowerBound * PoolGeometry.chunksPerSection, chunkCountLog2: chunkCountLog2)
        let bases = Locked<[HeaderSlot: SectionHeader]>([:])
        let outcomes: [UpdateOutcome<SectionHeader>]
        do {
            outcomes = try await link.updateEach(
                slots, UpdatePolicy(attemptsMax: 1, log: .commit(record: link.grant.recordAddress(chunk: block.firstChunk))), requireAll: true,
                known: known, before: [link.intentWrite(intent, slot: intentSlot)], trace: &trace
            ) { [owner] slot, header in
                bases.withLock { $0[slot] = header }
                return header.claimingForMultiSection(owner: owner)
            }
        } catch {
            takeEffects(of: &trace, on: link)
            throw .fabric(error)
        }
        takeEffects(of: &trace, on: link)
        let claimed = zip(slots, outcomes).compactMap { slot, outcome -> (HeaderSlot, SectionHeader, UInt64)? in
            guard case .committed(let header, let recordBefore) = outcome else { return nil }
            return (slot, header, recordBefore)
        }
        if claimed.count == sections.count {
            committedRun(claimed.map { ($0.0, $0.1) }, block: block, allocated: true, application: application, recordBefore: claimed[0].2,
                         intentSlot: intentSlot, link: link)
            return .claimed(block)
        }
        if claimed.isEmpty, outcomes.allSatisfy({ if case .refused = $0 { true } else { false } }) { return .stale }
        try await rollBack(claimed.map { ($0.0, $0.1) }, to: bases.withLock { $0 }, intentSlot: intentSlot, on: link, trace: &trace)
        return .lost(toPendingLog: outcomes.contains { outcome in
            if case .lost(let current) = outcome { SectionHeader(rawValue: current)?.logPending ?? false } else { false }
        })
    }

    /// Undoes the claims of a multi-section allocation that lost a race: each claimed
    /// section goes back to exactly the word it had (nobody else can change a section
    /// while this node's claim log is pending on it), and the intent is cleared after
    /// them, in one doorbell.
    private func rollBack(
        _ claimed: [(HeaderSlot, SectionHeader)], to bases: [HeaderSlot: SectionHeader], intentSlot: Int, on link: MemoryNodeLink,
        trace: inout OperationTrace
    ) async throws(AllocationError) {
        let slots = claimed.map(\.0)
        guard !slots.isEmpty else {
            do { _ = try await link.post([link.intentWrite(.none, slot: intentSlot)], trace: &trace) } catch { throw .fabric(error) }
            return
        }
        let outcomes: [UpdateOutcome<SectionHeader>]
        do {
            outcomes = try await link.updateEach(
                slots, UpdatePolicy(attemptsMax: 1), requireAll: true, known: claimed.map(\.1.rawValue),
                after: [link.intentWrite(.none, slot: intentSlot).fenced()], trace: &trace
            ) { slot, _ in bases[slot] }
        } catch {
            takeEffects(of: &trace, on: link)
            throw .fabric(error)
        }
        takeEffects(of: &trace, on: link)
        guard outcomes.allSatisfy({ if case .updated = $0 { true } else { false } }) else {
            throw .corruptMetadata("a claimed section changed under its claim (rollback of \(slots))")
        }
    }

    /// Frees a multi-section block. Once one section is released the free only rolls
    /// forward: the others are retried until released (only this node can change them).
    func freeSections(_ block: Block, application: ApplicationID, on link: MemoryNodeLink, trace: inout OperationTrace) async throws(AllocationError) {
        let slots = block.sections.map(HeaderSlot.section)
        try await waitForOwnFlushes(slots, on: link)
        let intentSlot = try await takeIntentSlot()
        var intentSlotHandedOver = false
        defer { if !intentSlotHandedOver { freeIntentSlots.withLock { $0.append(intentSlot) } } }
        let intent = IntentRecord(kind: .release, firstSection: block.section, sectionCountLog2: block.sectionCountLog2, owner: owner, application: application)
        let outcomes: [UpdateOutcome<SectionHeader>]
        do {
            outcomes = try await link.updateEach(
                slots, UpdatePolicy(attemptsMax: configuration.operationAttemptsMax, log: .commit(record: link.grant.recordAddress(chunk: block.firstChunk)),
                                    rereadOnRefusal: true),
                requireAll: true, before: [link.intentWrite(intent, slot: intentSlot)], trace: &trace
            ) { [owner] _, header in header.releasingFromMultiSection(owner: owner) }
        } catch {
            takeEffects(of: &trace, on: link)
            throw .fabric(error)
        }
        takeEffects(of: &trace, on: link)
        var released: [(HeaderSlot, SectionHeader)] = []
        var recordBefore: UInt64?
        for (slot, outcome) in zip(slots, outcomes) {
            switch outcome {
            case .committed(let header, let before):
                released.append((slot, header))
                recordBefore = recordBefore ?? before
            case .refused: throw .corruptMetadata("sections \(block.sections) do not hold \(block)")
            case .lost: throw .retryLimitExceeded(attempts: configuration.operationAttemptsMax)
            case .updated: preconditionFailure("a block operation answers committed")
            }
        }
        intentSlotHandedOver = true
        committedRun(released, block: block, allocated: false, application: application, recordBefore: recordBefore!, intentSlot: intentSlot, link: link)
    }

    /// After a multi-section claim or release: checks the postcondition (every section
    /// whole or empty, with this node's pending log), records the logs, and flushes them
    /// in the background (`MemoryNodeLink.flushRun`), which also clears the intent.
    private func committedRun(
        _ headers: [(HeaderSlot, SectionHeader)], block: Block, allocated: Bool, application: ApplicationID, recordBefore: UInt64,
        intentSlot: Int, link: MemoryNodeLink
    ) {
        for (slot, header) in headers {
            precondition(allocated ? header.isAllWhole : header.isAllEmpty, "a multi-section commit left \(slot) as \(header)")
        }
        let (log, serials) = link.logCommittedRun(headers, block: block, allocated: allocated, application: application, recordBefore: recordBefore)
        startUpkeep { [self] in
            var trace = OperationTrace()
            await link.flushRun(
                headers, log: log, serials: serials, intentSlot: intentSlot, attemptsMax: configuration.flushAttemptsMax,
                backoffNanos: configuration.backoffNanos, runtime: runtime, trace: &trace)
            takeEffects(of: &trace, on: link)
            freeIntentSlots.withLock { $0.append(intentSlot) }
            return trace
        }
    }
}
