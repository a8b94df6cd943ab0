/// The section layer: blocks of 1-16 whole spans (128 KiB-2 MiB) inside one section,
/// committed by one CAS on the section header; and multi-section blocks (over 2 MiB):
/// aligned runs of whole sections, announced by an intent record and claimed in one
/// doorbell.
enum SectionChoice: Sendable {
    case claim(section: Int, word: UInt64, offset: Int)
    case wait
}

extension BlockAllocator {
    /// Picks a section with an aligned run of `2^spansLog2` empty spans: a normal section
    /// already in use first, then a wholly empty one, then a contended one.
    func chooseSection(spansLog2: Int, cache: inout HeaderCache, node: MemoryNodeState<Connection>) -> SectionChoice? {
        let count = cache.sections.count
        var empty: SectionChoice?
        var contended: SectionChoice?
        var skippedBusy = false
        for step in 0..<count {
            let s = (cache.cursor + step) % count
            guard let section = HeaderCache.settled(SectionHeader.self, cache.sections[s]),
                  let offset = section.firstEmptyRun(sizeLog2: spansLog2)
            else { continue }
            let address = node.sectionAddress(s)
            if cache.busy.contains(address) { skippedBusy = true; continue }
            let choice = SectionChoice.claim(section: s, word: cache.sections[s], offset: offset)
            if section.contended || waitsForFlush(SectionHeader.self, cache.sections[s], at: address, on: node) {
                if contended == nil { contended = choice }
            } else if section.isAllEmpty {
                if empty == nil { empty = choice }
            } else {
                cache.busy.insert(address)
                return choice
            }
        }
        guard let chosen = empty ?? contended else { return skippedBusy ? .wait : nil }
        if case .claim(let s, _, _) = chosen { cache.busy.insert(node.sectionAddress(s)) }
        return chosen
    }

    /// Allocates `2^sizeLog2` chunks (5 ≤ sizeLog2 ≤ 9) as whole spans; nil when no room.
    func allocateSpans(
        sizeLog2: Int, application: ApplicationID, on node: MemoryNodeState<Connection>, trace: inout OperationTrace
    ) async throws(AllocationError) -> Block? {
        let spansLog2 = sizeLog2 - 5
        var refreshed = false
        var failures: [Int: Int] = [:]
        var backoff = Backoff(configuration)
        while trace.attempts < configuration.maxAttempts {
            switch node.cache.withLock({ chooseSection(spansLog2: spansLog2, cache: &$0, node: node) }) {
            case nil:
                if refreshed { return nil }
                refreshed = true
                try await refresh(node, trace: &trace)
            case .wait:
                try await backoff.pause(runtime)
            case .claim(let s, let word, let offset):
                let address = node.sectionAddress(s)
                defer { releaseBusy(address, on: node) }
                let failed = failures[s, default: 0]
                let result = try await commit(
                    SectionHeader.self, at: address, cached: word, on: node, trace: &trace,
                    requeue: { flushIfReturned($0, exchanged: $1, node: node, section: s) }
                ) { header in
                    header.claiming(spanOffset: offset, sizeLog2: spansLog2, owner: owner).map { markingContention($0, failures: failed) }
                }
                switch result {
                case .committed(let header):
                    let block = Block(memoryNode: node.grant.memoryNode, firstChunk: s * PoolGeometry.chunksPerSection + offset * PoolGeometry.chunksPerSpan, sizeLog2: sizeLog2)
                    committedSection(header, block: block, allocated: true, application: application, section: s, node: node)
                    node.cache.withLock { $0.cursor = s }
                    return block
                case .lost(let original):
                    node.cache.withLock { $0.sections[s] = original }
                    failures[s, default: 0] += 1
                    trace.retries += 1
                    try await lost(to: original, SectionHeader.self, backoff: &backoff, trace: &trace)
                case .notApplicable:
                    trace.attempts += 1
                }
            }
        }
        throw .retryLimitExceeded(attempts: trace.attempts)
    }

    /// Frees a section-layer block: one CAS on its section header.
    func freeSpans(_ block: Block, application: ApplicationID, on node: MemoryNodeState<Connection>, trace: inout OperationTrace) async throws(AllocationError) {
        let s = block.firstChunk / PoolGeometry.chunksPerSection
        let offset = block.firstChunk % PoolGeometry.chunksPerSection / PoolGeometry.chunksPerSpan
        let spansLog2 = block.sizeLog2 - 5
        let address = node.sectionAddress(s)
        var freshlyRead = false
        var backoff = Backoff(configuration)
        try await acquireBusy(address, on: node, backoff: &backoff)
        defer { releaseBusy(address, on: node) }
        while trace.attempts < configuration.maxAttempts {
            let word = node.cache.withLock { $0.sections[s] }
            let result = try await commit(
                SectionHeader.self, at: address, cached: word, on: node, trace: &trace,
                requeue: { flushIfReturned($0, exchanged: $1, node: node, section: s) }
            ) { $0.releasing(spanOffset: offset, sizeLog2: spansLog2, owner: owner) }
            switch result {
            case .committed(let header):
                committedSection(header, block: block, allocated: false, application: application, section: s, node: node)
                return
            case .lost(let original):
                node.cache.withLock { $0.sections[s] = original }
                trace.retries += 1
                try await lost(to: original, SectionHeader.self, backoff: &backoff, trace: &trace)
            case .notApplicable:
                guard !freshlyRead else { throw .corruptMetadata("section header \(address) does not hold \(block)") }
                freshlyRead = true
                trace.attempts += 1
                let fresh = try await post([.readWords(address, count: 1, rkey: node.metadataKey)], on: node, trace: &trace)[0].words[0]
                node.cache.withLock { $0.sections[s] = fresh }
            }
        }
        throw .retryLimitExceeded(attempts: trace.attempts)
    }

    /// If an operation took this node's queued log on a section header and its CAS failed,
    /// flush that log in the background.
    func flushIfReturned(_ prepared: PreparedHeader, exchanged: Bool, node: MemoryNodeState<Connection>, section s: Int) {
        guard settle(prepared, exchanged: exchanged, pending: node.pending) else { return }
        startUpkeep { [self] in
            var trace = OperationTrace()
            await flushSection(s, on: node, trace: &trace)
            return trace
        }
    }

    private func flushSection(_ s: Int, on node: MemoryNodeState<Connection>, trace: inout OperationTrace) async {
        let cached = node.cache.withLock { $0.sections[s] }
        if let after = await flush(SectionHeader.self, header: node.sectionAddress(s), cached: cached, on: node, trace: &trace) {
            node.cache.withLock { $0.sections[s] = after }
        }
    }

    private func committedSection(
        _ header: SectionHeader, block: Block, allocated: Bool, application: ApplicationID, section s: Int, node: MemoryNodeState<Connection>
    ) {
        let address = node.sectionAddress(s)
        let record = record(allocated: allocated, block: block, application: application, sequence: header.log.sequence, node: node)
        node.pending.withLock { $0.add(header: address, recordAddress: node.recordAddress(block.firstChunk), record: record, sequence: header.log.sequence, taken: false) }
        node.cache.withLock { $0.sections[s] = header.rawValue }
        startUpkeep { [self] in
            var trace = OperationTrace()
            await flushSection(s, on: node, trace: &trace)
            return trace
        }
    }

    // MARK: Multi-section blocks

    /// Takes a free intent slot of this node, waiting (bounded) while all are busy.
    private func takeIntentSlot() async throws(AllocationError) -> Int {
        var backoff = Backoff(configuration)
        while true {
            if let slot = freeIntentSlots.withLock({ $0.popLast() }) { return slot }
            do { try await backoff.pause(runtime) } catch { throw .intentSlotsBusy }
        }
    }

    /// Picks an aligned run of `count` wholly empty sections, searching from the end of
    /// the pool (small blocks fill from each node's cursor, large ones from the top).
    private func chooseRun(count: Int, cache: inout HeaderCache, node: MemoryNodeState<Connection>) -> (first: Int, words: [UInt64])?? {
        let groups = cache.sections.count / count
        var skippedBusy = false
        for group in stride(from: groups - 1, through: 0, by: -1) {
            let range = group * count..<(group + 1) * count
            let free = range.allSatisfy { s in HeaderCache.settled(SectionHeader.self, cache.sections[s])?.isAllEmpty ?? false }
            guard free else { continue }
            if range.contains(where: { cache.busy.contains(node.sectionAddress($0)) }) { skippedBusy = true; continue }
            for s in range { cache.busy.insert(node.sectionAddress(s)) }
            return .some((range.lowerBound, range.map { cache.sections[$0] }))
        }
        return skippedBusy ? .some(nil) : nil
    }

    /// Allocates `2^sizeLog2` chunks (sizeLog2 ≥ 10) as an aligned run of whole sections.
    ///
    /// One doorbell writes the intent record, flushes any queued logs of this node on those
    /// sections, and sends one CAS per section. If any CAS fails, the ones that succeeded
    /// are rolled back (nobody else can change a claimed section) and the intent cleared,
    /// in one more doorbell; a crash in between leaves the intent for recovery.
    func allocateSections(
        sizeLog2: Int, application: ApplicationID, on node: MemoryNodeState<Connection>, trace: inout OperationTrace
    ) async throws(AllocationError) -> Block? {
        let countLog2 = sizeLog2 - 9
        let count = 1 << countLog2
        guard count <= node.geometry.sectionCount else { return nil }
        let slot = try await takeIntentSlot()
        var slotHandedOver = false
        defer { if !slotHandedOver { freeIntentSlots.withLock { $0.append(slot) } } }
        let intentAddress = node.intentAddress(owner, slot)
        var refreshed = false
        var backoff = Backoff(configuration)
        while trace.attempts < configuration.maxAttempts {
            guard let choice = node.cache.withLock({ chooseRun(count: count, cache: &$0, node: node) }) else {
                if refreshed { return nil }
                refreshed = true
                try await refresh(node, trace: &trace)
                continue
            }
            guard let (first, words) = choice else {
                try await backoff.pause(runtime)
                continue
            }
            let sections = Array(first..<first + count)
            defer { node.cache.withLock { cache in for s in sections { cache.busy.remove(node.sectionAddress(s)) } } }
            let intent = IntentRecord(kind: .claim, firstSection: first, sectionCountLog2: countLog2, owner: owner, application: application)
            let prepared = zip(sections, words).map { s, word in
                prepareHeader(SectionHeader.self, cached: word, at: node.sectionAddress(s), pending: node.pending, recordKey: node.metadataKey)
            }
            let desired = prepared.map { SectionHeader(rawValue: $0.base)?.claimingForMultiSection(owner: owner) }
            guard desired.allSatisfy({ $0 != nil }) else {
                for (s, p) in zip(sections, prepared) { flushIfReturned(p, exchanged: false, node: node, section: s) }
                trace.attempts += 1
                continue
            }
            var verbs: [Verb] = [.writeWord(intentAddress, intent.rawValue, rkey: node.metadataKey)]
            verbs += prepared.compactMap(\.flush)
            for (p, d) in zip(prepared, desired) {
                verbs.append(.compareAndSwap(p.headerAddress, expected: p.expected, desired: d!.rawValue, rkey: node.metadataKey))
            }
            let answers = try await post(verbs, on: node, trace: &trace).suffix(count).map(\.compareAndSwap)
            let won = answers.allSatisfy(\.exchanged)
            for (s, p) in zip(sections, prepared) {
                // A queued log this batch flushed is done either way if its CAS committed.
                flushIfReturned(p, exchanged: answers[s - first].exchanged, node: node, section: s)
            }
            if won {
                let block = Block(memoryNode: node.grant.memoryNode, firstChunk: first * PoolGeometry.chunksPerSection, sizeLog2: sizeLog2)
                slotHandedOver = true
                committedRun(block: block, sections: sections, headers: desired.map { $0! }, allocated: true, application: application, intentSlot: slot, node: node)
                return block
            }
            // Lost a race: roll back what was claimed, to the flushed original, and clear the intent.
            var rollback: [Verb] = []
            for (i, answer) in answers.enumerated() where answer.exchanged {
                rollback.append(.compareAndSwap(prepared[i].headerAddress, expected: desired[i]!.rawValue, desired: prepared[i].base, rkey: node.metadataKey))
            }
            rollback.append(.writeWord(intentAddress, IntentRecord.none.rawValue, rkey: node.metadataKey))
            let undone = try await post(rollback, on: node, trace: &trace).dropLast().map(\.compareAndSwap)
            guard undone.allSatisfy(\.exchanged) else {
                throw .corruptMetadata("a claimed section changed under its claim (rollback of \(sections))")
            }
            node.cache.withLock { cache in
                for (i, answer) in answers.enumerated() { cache.sections[sections[i]] = answer.exchanged ? prepared[i].base : answer.original }
            }
            trace.retries += UInt64(answers.count { !$0.exchanged })
            let pendingLoss = answers.contains { !$0.exchanged && isPendingLog(SectionHeader.self, $0.original) }
            try await lost(to: pendingLoss, backoff: &backoff, trace: &trace)
        }
        throw .retryLimitExceeded(attempts: trace.attempts)
    }

    /// Frees a multi-section block. Once one section is released the free only rolls
    /// forward: the others are retried until released (only this node can change them).
    func freeSections(_ block: Block, application: ApplicationID, on node: MemoryNodeState<Connection>, trace: inout OperationTrace) async throws(AllocationError) {
        let first = block.firstChunk / PoolGeometry.chunksPerSection
        let countLog2 = block.sizeLog2 - 9
        let sections = Array(first..<first + (1 << countLog2))
        try await waitForOwnFlushes(sections.map(node.sectionAddress), on: node)
        let slot = try await takeIntentSlot()
        var slotHandedOver = false
        defer { if !slotHandedOver { freeIntentSlots.withLock { $0.append(slot) } } }
        let intentAddress = node.intentAddress(owner, slot)
        let intent = IntentRecord(kind: .release, firstSection: first, sectionCountLog2: countLog2, owner: owner, application: application)
        var released: [Int: SectionHeader] = [:]
        var freshlyRead = false
        var backoff = Backoff(configuration)
        while trace.attempts < configuration.maxAttempts {
            let remaining = sections.filter { released[$0] == nil }
            let words = node.cache.withLock { cache in remaining.map { cache.sections[$0] } }
            let desired = words.map { HeaderCache.settled(SectionHeader.self, $0)?.releasingFromMultiSection(owner: owner) }
            guard desired.allSatisfy({ $0 != nil }) else {
                guard !freshlyRead else { throw .corruptMetadata("sections \(sections) do not hold \(block)") }
                freshlyRead = true
                trace.attempts += 1
                let fresh = try await post(remaining.map { .readWords(node.sectionAddress($0), count: 1, rkey: node.metadataKey) }, on: node, trace: &trace)
                node.cache.withLock { cache in for (s, r) in zip(remaining, fresh) { cache.sections[s] = r.words[0] } }
                continue
            }
            var verbs: [Verb] = released.isEmpty ? [.writeWord(intentAddress, intent.rawValue, rkey: node.metadataKey)] : []
            for (i, s) in remaining.enumerated() {
                let expected = HeaderCache.settled(SectionHeader.self, words[i])!.rawValue
                verbs.append(.compareAndSwap(node.sectionAddress(s), expected: expected, desired: desired[i]!.rawValue, rkey: node.metadataKey))
            }
            let answers = try await post(verbs, on: node, trace: &trace).suffix(remaining.count).map(\.compareAndSwap)
            node.cache.withLock { cache in
                for (i, s) in remaining.enumerated() {
                    cache.sections[s] = answers[i].exchanged ? desired[i]!.rawValue : answers[i].original
                    if answers[i].exchanged { released[s] = desired[i]! }
                }
            }
            if released.count == sections.count {
                slotHandedOver = true
                committedRun(block: block, sections: sections, headers: sections.map { released[$0]! }, allocated: false, application: application, intentSlot: slot, node: node)
                return
            }
            trace.retries += UInt64(answers.count { !$0.exchanged })
            let pendingLoss = answers.contains { !$0.exchanged && isPendingLog(SectionHeader.self, $0.original) }
            try await lost(to: pendingLoss, backoff: &backoff, trace: &trace)
        }
        throw .retryLimitExceeded(attempts: trace.attempts)
    }

    /// After a multi-section claim or release, in the background: one doorbell writes the
    /// block's full-log record and clears each section's pending bit (a clear that loses to a
    /// span-state change is retried); a last one clears the intent.
    private func committedRun(
        block: Block, sections: [Int], headers: [SectionHeader], allocated: Bool, application: ApplicationID, intentSlot: Int,
        node: MemoryNodeState<Connection>
    ) {
        let recordWord = record(allocated: allocated, block: block, application: application, sequence: headers[0].log.sequence, node: node)
        let recordAddress = node.recordAddress(block.firstChunk)
        node.pending.withLock { table in
            for (s, h) in zip(sections, headers) {
                table.add(header: node.sectionAddress(s), recordAddress: recordAddress, record: recordWord, sequence: h.log.sequence, taken: true)
            }
        }
        node.cache.withLock { cache in for (s, h) in zip(sections, headers) { cache.sections[s] = h.rawValue } }
        startUpkeep { [self] in
            var trace = OperationTrace()
            var current = Dictionary(uniqueKeysWithValues: zip(sections, headers.map(\.rawValue)))
            var verbs: [Verb] = [.writeWord(recordAddress, recordWord, rkey: node.metadataKey)]
            for _ in 0..<configuration.maxAttempts {
                let open = sections.filter { current[$0] != nil }
                if open.isEmpty { break }
                var targets: [Int: UInt64] = [:]
                for s in open {
                    guard let header = SectionHeader(rawValue: current[s]!), header.logPending, header.log.owner == owner, let flushed = header.flushed() else {
                        current[s] = nil
                        continue
                    }
                    targets[s] = flushed.rawValue
                    verbs.append(.compareAndSwap(node.sectionAddress(s), expected: current[s]!, desired: flushed.rawValue, rkey: node.metadataKey))
                }
                let sent = open.filter { targets[$0] != nil }
                guard !sent.isEmpty, let results = try? await post(verbs, on: node, trace: &trace) else { break }
                for (s, result) in zip(sent, results.suffix(sent.count)) {
                    let answer = result.compareAndSwap
                    node.cache.withLock { $0.sections[s] = answer.exchanged ? targets[s]! : answer.original }
                    current[s] = answer.exchanged ? nil : answer.original
                }
                verbs = []
            }
            _ = try? await post([.writeWord(node.intentAddress(owner, intentSlot), IntentRecord.none.rawValue, rkey: node.metadataKey)], on: node, trace: &trace)
            node.pending.withLock { table in
                for (s, h) in zip(sections, headers) { table.remove(node.sectionAddress(s), sequence: h.log.sequence) }
            }
            freeIntentSlots.withLock { $0.append(intentSlot) }
            return trace
        }
    }
}
