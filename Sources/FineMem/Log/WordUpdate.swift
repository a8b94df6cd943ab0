/// Where an update finds the word it changes and keeps the answers: a header in the
/// link's cache (starting from the cached word, or from one the caller just learned), or
/// a word outside the cache that the caller knows (a node-table slot).
enum WordHome: Sendable {
    case header(HeaderSlot, known: UInt64? = nil)
    case word(RemoteAddress, known: UInt64)
}

/// How an update treats a header's temporary log.
enum LogHandling: Sendable {
    /// A state change (span open or close, a hint, a node slot): expect the cached word
    /// and keep its log as it is.
    case keep
    /// A block operation (claim or release): it commits on top of the flushed header.
    /// This node's own queued log on the header is folded in (its record WRITE rides
    /// before the CAS, which expects the pending word); anyone else's pending log is
    /// predicted flushed, and a wrong guess costs one lost CAS whose answer refreshes the
    /// cache.
    case commitAfterFlush
}

/// The bound and manner of one update.
struct UpdatePolicy: Sendable {
    /// CAS attempts before the update answers `lost`.
    var attemptsMax: Int
    var log: LogHandling = .keep
    /// When the transition refuses the cached word, read the word once and try again
    /// (the cache may be stale).
    var rereadOnRefusal = false
}

/// The answer of an update.
enum UpdateOutcome<Word: MetadataWord>: Sendable {
    /// A CAS committed this word.
    case updated(Word)
    /// The transition does not apply to the word as last seen.
    case refused(current: UInt64)
    /// Every attempt's CAS lost; this is the word the last one found.
    case lost(current: UInt64)
}

extension MemoryNodeLink {
    /// The one way the protocol changes a remote metadata word (the LLFree `try_update` of
    /// this package): apply the pure `transition` to the word as cached, send the CAS
    /// (after `before` and any folded log WRITE, followed by READs of `alsoRead`, all in
    /// one doorbell), write the answer back to the cache, count a lost CAS in `trace`,
    /// and try again from the answer until `policy.attemptsMax` CASes have lost.
    ///
    /// `before` and `alsoRead` ride the first doorbell only; the READs land in the cache.
    func update<Word: MetadataWord>(
        _ home: WordHome, _ policy: UpdatePolicy, before: [Verb] = [], alsoRead: [HeaderSlot] = [],
        trace: inout OperationTrace, _ transition: (Word) -> Word?
    ) async throws(FabricError) -> UpdateOutcome<Word> {
        precondition(policy.attemptsMax >= 1, "an update needs at least one attempt")
        let address: RemoteAddress
        var known: UInt64
        switch home {
        case .header(let slot, let word):
            address = grant.address(of: slot)
            known = word ?? cache.withLock { $0[slot] }
        case .word(let wordAddress, let word):
            address = wordAddress
            known = word
        }
        var riders = before
        var readsAfter = alsoRead
        var rereadLeft = policy.rereadOnRefusal
        var lostCount = 0
        while true {
            let prepared = prepare(Word.self, home, known, policy.log)
            guard let base = Word(rawValue: prepared.base), let desired = transition(base) else {
                settle(prepared, committed: false)
                guard rereadLeft else { return .refused(current: known) }
                rereadLeft = false
                let results = try await post(riders + [.readWords(address, count: 1, rkey: metadataKey)], trace: &trace)
                riders = []
                known = results.last!.words[0]
                store(known, at: home)
                continue
            }
            let verbs = riders + (prepared.foldedLog.map { [flushWrite($0.log)] } ?? [])
                + [.compareAndSwap(address, expected: prepared.expected, desired: desired.rawValue, rkey: metadataKey)]
                + readsAfter.map(read)
            let results: [VerbResult]
            do { results = try await post(verbs, trace: &trace) } catch {
                settle(prepared, committed: false)
                throw error
            }
            let answer = results[verbs.count - readsAfter.count - 1].compareAndSwap
            known = answer.exchanged ? desired.rawValue : answer.original
            store(known, at: home)
            storeReads(readsAfter, results.suffix(readsAfter.count))
            riders = []
            readsAfter = []
            settle(prepared, committed: answer.exchanged)
            if answer.exchanged { return .updated(desired) }
            trace.retries += 1
            lostCount += 1
            if lostCount >= policy.attemptsMax { return .lost(current: known) }
        }
    }

    /// `update` for several headers at once, one CAS each in the same doorbell (after
    /// `before`, followed by `after`; both ride the first doorbell only). A header whose
    /// CAS lost is tried again in the next doorbell, up to `policy.attemptsMax` doorbells.
    /// With `requireAll`, a transition refused on any header sends nothing at all: every
    /// header answers `refused`. `known` (in the order of `slots`) replaces the cached
    /// words in the first round. Outcomes come in the order of `slots`.
    func updateEach<Header: LoggedHeader>(
        _ slots: [HeaderSlot], _ policy: UpdatePolicy, requireAll: Bool = false, known firstKnown: [UInt64]? = nil,
        before: [Verb] = [], after: [Verb] = [], trace: inout OperationTrace, _ transition: (HeaderSlot, Header) -> Header?
    ) async throws(FabricError) -> [UpdateOutcome<Header>] {
        precondition(policy.attemptsMax >= 1, "an update needs at least one attempt")
        precondition(Set(slots).count == slots.count, "each header once")
        precondition(firstKnown.map { $0.count == slots.count } ?? true, "one known word per header")
        var firstKnown = firstKnown
        var outcomes: [UpdateOutcome<Header>?] = Array(repeating: nil, count: slots.count)
        var riders = before
        var trailers = after
        var rereadLeft = policy.rereadOnRefusal
        var round = 0
        while round < policy.attemptsMax {
            let open = slots.indices.filter { outcomes[$0] == nil }
            if open.isEmpty { break }
            let known = firstKnown.map { words in open.map { words[$0] } } ?? cache.withLock { cache in open.map { cache[slots[$0]] } }
            firstKnown = nil
            let prepared = zip(open, known).map { index, word in prepare(Header.self, .header(slots[index]), word, policy.log) }
            let desired = zip(open, prepared).map { index, prepared in Header(rawValue: prepared.base).flatMap { transition(slots[index], $0) } }
            let refused = desired.contains { $0 == nil }
            if refused, rereadLeft || requireAll {
                for item in prepared { settle(item, committed: false) }
                guard rereadLeft else {
                    for (index, word) in zip(open, known) { outcomes[index] = .refused(current: word) }
                    break
                }
                rereadLeft = false
                let stale = zip(open, desired).filter { $0.1 == nil }.map { slots[$0.0] }
                let results = try await post(riders + stale.map(read), trace: &trace)
                riders = []
                storeReads(stale, results.suffix(stale.count))
                continue
            }
            var verbs = riders
            var sent: [(index: Int, prepared: PreparedWord, desired: Header)] = []
            for (position, index) in open.enumerated() {
                guard let target = desired[position] else {
                    settle(prepared[position], committed: false)
                    outcomes[index] = .refused(current: known[position])
                    continue
                }
                if let folded = prepared[position].foldedLog { verbs.append(flushWrite(folded.log)) }
                sent.append((index, prepared[position], target))
            }
            if sent.isEmpty { break }
            let firstCAS = verbs.count
            for item in sent {
                verbs.append(.compareAndSwap(grant.address(of: slots[item.index]), expected: item.prepared.expected, desired: item.desired.rawValue, rkey: metadataKey))
            }
            verbs += trailers
            let results: [VerbResult]
            do { results = try await post(verbs, trace: &trace) } catch {
                for item in sent { settle(item.prepared, committed: false) }
                throw error
            }
            riders = []
            trailers = []
            round += 1
            for (offset, item) in sent.enumerated() {
                let answer = results[firstCAS + offset].compareAndSwap
                let word = answer.exchanged ? item.desired.rawValue : answer.original
                store(word, at: .header(slots[item.index]))
                settle(item.prepared, committed: answer.exchanged)
                if answer.exchanged {
                    outcomes[item.index] = .updated(item.desired)
                } else {
                    trace.retries += 1
                    if round >= policy.attemptsMax { outcomes[item.index] = .lost(current: word) }
                }
            }
        }
        return outcomes.enumerated().map { index, outcome in outcome ?? .refused(current: cache.withLock { $0[slots[index]] }) }
    }

    // MARK: Parts

    private func store(_ word: UInt64, at home: WordHome) {
        if case .header(let slot, _) = home { cache.withLock { $0[slot] = word } }
    }

    private func storeReads(_ slots: [HeaderSlot], _ results: ArraySlice<VerbResult>) {
        guard !slots.isEmpty else { return }
        let words = results.map { $0.words[0] }
        cache.withLock { cache in for (slot, word) in zip(slots, words) { cache[slot] = word } }
    }

    /// Decides the expected word and the transition's base (see `LogHandling`).
    private func prepare<Word: MetadataWord>(_ type: Word.Type, _ home: WordHome, _ word: UInt64, _ handling: LogHandling) -> PreparedWord {
        guard handling == .commitAfterFlush else { return .plain(word) }
        guard case .header(let slot, _) = home else { preconditionFailure("block operations commit on headers") }
        guard let header = Word(rawValue: word) as? any LoggedHeader, header.logPending, let flushed = header.flushed() else {
            return .plain(word)
        }
        if let own = pending.withLock({ $0.take(slot) }) {
            return PreparedWord(expected: word, base: flushed.rawValue, foldedLog: (slot, own))
        }
        return PreparedWord(expected: flushed.rawValue, base: flushed.rawValue, foldedLog: nil)
    }

    /// After the CAS of a prepared word: a folded log is flushed if the CAS committed;
    /// otherwise the job goes back to the table and someone must flush it.
    private func settle(_ prepared: PreparedWord, committed: Bool) {
        guard let (slot, log) = prepared.foldedLog else { return }
        pending.withLock { table in
            if committed { table.remove(slot, sequence: log.sequence) } else { table.release(slot, sequence: log.sequence) }
        }
        if !committed { logReturned(slot) }
    }
}
