/// Where an update finds the word it changes and keeps the answers: a header in the
/// link's cache (starting from the cached word, or from one the caller just learned), or
/// a word outside the cache that the caller knows (a node-table slot).
package enum WordHome: Sendable {
    case header(HeaderSlot, known: UInt64? = nil)
    case word(RemoteAddress, known: UInt64)
}

/// How an update treats a header's temporary log and the full log.
package enum LogHandling: Sendable {
    /// A state change (span open or close, a hint, a node slot): expect the cached word
    /// and keep its log as it is.
    case keep
    /// A block operation (claim or release) of the block whose full-log record is at
    /// `record`: it commits on top of the flushed header. This node's own queued log on
    /// the header is folded in (its record CAS rides before the commit CAS, which expects
    /// the pending word); anyone else's pending log is predicted flushed, and a wrong guess
    /// costs one lost CAS whose answer refreshes the cache. A READ of `record` rides after
    /// the CAS: with the log pending nobody else writes that record, so what it answers is
    /// the value the flush will expect to replace.
    case commit(record: RemoteAddress)
    /// The flush of this node's pending log `log`: its record CAS (from the value read at
    /// commit to the operation's record) rides the first doorbell, before the header CAS.
    case flush(PendingLog)
}

/// The bound and manner of one update.
package struct UpdatePolicy: Sendable {
    /// CAS attempts before the update answers `lost`.
    package var attemptsMax: Int
    package var log: LogHandling = .keep
    /// When the transition refuses the word as cached, read the word once and try again:
    /// a decision not to change remote state rests on a fresh READ, not on the cache.
    package var rereadOnRefusal = false

    package init(attemptsMax: Int, log: LogHandling = .keep, rereadOnRefusal: Bool = false) {
        self.attemptsMax = attemptsMax
        self.log = log
        self.rereadOnRefusal = rereadOnRefusal
    }
}

/// A metadata word of no particular type: what the update loop works on.
package struct RawWord: MetadataWord {
    package let rawValue: UInt64
    package init(rawValue: UInt64) { self.rawValue = rawValue }
    package init(_ rawValue: UInt64) { self.rawValue = rawValue }
}

/// The answer of an update.
package enum UpdateOutcome<Word: MetadataWord>: Sendable {
    /// A state change's CAS (or a flush's) committed this word.
    case updated(Word)
    /// A block operation's CAS committed this word; `recordBefore` is the block's full-log
    /// record right after the commit (read in the same doorbell).
    case committed(Word, recordBefore: UInt64)
    /// The transition does not apply to the word as last seen.
    case refused(current: UInt64)
    /// Every attempt's CAS lost; this is the word the last one found.
    case lost(current: UInt64)

    /// The same answer with its word decoded as `type` (which the transition produced).
    package func map<Other: MetadataWord>(_ type: Other.Type) -> UpdateOutcome<Other> {
        switch self {
        case .updated(let word): .updated(Other(rawValue: word.rawValue)!)
        case .committed(let word, let recordBefore): .committed(Other(rawValue: word.rawValue)!, recordBefore: recordBefore)
        case .refused(let current): .refused(current: current)
        case .lost(let current): .lost(current: current)
        }
    }

    /// The word a CAS of this update committed, whichever kind.
    package var committedWord: Word? {
        switch self {
        case .updated(let word), .committed(let word, _): word
        case .refused, .lost: nil
        }
    }
}

extension MemoryNodeLink {
    /// The one way the protocol changes a remote metadata word (the LLFree `try_update` of
    /// this package): apply the pure `transition` to the word as cached, send the CAS
    /// (after `before` and whatever the log handling adds, followed by READs of
    /// `alsoRead`, all in one doorbell), write the answers back to the cache, count a lost
    /// CAS in `trace`, and try again from the answer until `policy.attemptsMax` CASes have
    /// lost.
    ///
    /// `before` and `alsoRead` ride the first doorbell only; the READs land in the cache.
    func update<Word: MetadataWord>(
        _ home: WordHome, _ policy: UpdatePolicy, before: [Verb] = [], alsoRead: [HeaderSlot] = [],
        trace: inout OperationTrace, _ transition: (Word) -> Word?
    ) async throws(FabricError) -> UpdateOutcome<Word> {
        let outcomes = try await updateWords(
            [home], policy, before: before, alsoRead: alsoRead, trace: &trace,
            transition: { _, word in Word(rawValue: word).flatMap(transition)?.rawValue },
            flushed: { _, word in (Word(rawValue: word) as? any LoggedHeader)?.flushed()?.rawValue })
        return outcomes[0].map(Word.self)
    }

    /// `update` of a header: the same, with the header type's own `flushed()` (no dynamic
    /// cast per call), and a block operation's single-attempt commit on the fast path
    /// (`commitFast`).
    package func update<Header: LoggedHeader>(
        _ home: WordHome, _ policy: UpdatePolicy, alsoRead: [HeaderSlot] = [],
        trace: inout OperationTrace, _ transition: (Header) -> Header?
    ) async throws(FabricError) -> UpdateOutcome<Header> {
        if case .commit(let record) = policy.log, case .header(let slot, nil) = home, alsoRead.isEmpty,
           let outcome = try await commitFast(slot, record: record, policy, trace: &trace, transition) {
            return outcome
        }
        switch policy.log {
        case .keep, .flush:
            if case .header(let slot, let known) = home, alsoRead.isEmpty,
               let outcome = try await updateFast(slot, known: known, policy, trace: &trace, transition) {
                return outcome
            }
        case .commit:
            break
        }
        let outcomes = try await updateWords(
            [home], policy, alsoRead: alsoRead, trace: &trace,
            transition: { _, word in Header(rawValue: word).flatMap(transition)?.rawValue },
            flushed: { _, word in Header(rawValue: word)?.flushed()?.rawValue })
        return outcomes[0].map(Header.self)
    }

    /// A block operation's commit on one header, as `updateWords` does it with
    /// `.commit(record:)`, its first attempt in one `WordBatch` (no array, no heap
    /// allocation): this node's queued log on the header folded in (its record CAS first),
    /// the commit CAS, the READ of the block's record. Answers nil, having sent nothing,
    /// when the transition refuses the cached word: the general path decides what that
    /// means (a reread, or a refusal). A lost CAS with attempts left is tried again from
    /// its answer.
    private func commitFast<Header: LoggedHeader>(
        _ slot: HeaderSlot, record: RemoteAddress, _ policy: UpdatePolicy, trace: inout OperationTrace, _ transition: (Header) -> Header?
    ) async throws(FabricError) -> UpdateOutcome<Header>? {
        // The cached word and this node's queued log on it, taken to fold in, in one
        // critical section. The transition applies to the flushed word whether or not
        // the log is folded in (`prepare`), so it is decided before the log is taken.
        let decided = cache.withShard(of: slot) { cache -> (target: Header, prepared: PreparedWord)? in
            let word = cache[slot]
            let flushed = Header(rawValue: word)?.flushed()?.rawValue
            guard let target = Header(rawValue: flushed ?? word).flatMap(transition) else { return nil }
            return (target, Self.prepare(slot, word, flushed: flushed, pending: &cache.pending))
        }
        guard let (target, prepared) = decided else { return nil }
        var batch = WordBatch()
        let fold = prepared.foldedLog.map { batch.compareAndSwap($0.log.recordAddress, expected: $0.log.recordBefore, desired: $0.log.record.rawValue, rkey: metadataKey) }
        let commit = batch.compareAndSwap(grant.address(of: slot), expected: prepared.expected, desired: target.rawValue, rkey: metadataKey)
        let recordRead = batch.read(record, rkey: metadataKey)
        trace.batches += 1
        trace.verbs += UInt64(batch.count)
        let ticket = drawTicket()
        do { try await connection(for: trace).post(&batch) } catch {
            markBroken()
            settle(prepared, committed: false, trace: &trace)
            throw error
        }
        if let fold, let folded = prepared.foldedLog { checkRecordUpdate(folded.log, batch.compareAndSwapAnswer(fold)) }
        let (exchanged, original) = batch.compareAndSwapAnswer(commit)
        // The answer and the folded log's end, in one critical section.
        cache.withShard(of: slot) { cache in
            cache.store(exchanged ? target.rawValue : original, at: slot, ticket: ticket)
            Self.settle(prepared, committed: exchanged, pending: &cache.pending)
        }
        if !exchanged, prepared.foldedLog != nil { logReturned(slot, trace: &trace) }
        if exchanged {
            noteRoom(of: slot, from: prepared.expected, to: target.rawValue, trace: &trace)
            return .committed(target, recordBefore: batch.word(recordRead))
        }
        trace.retries += 1
        return try await retry(slot, after: original, policy, trace: &trace, transition)
    }

    /// What follows a first attempt's lost CAS on one header: `lost`, or with attempts
    /// left, the rest of them from the word the CAS found (a flush's record already sent).
    private func retry<Header: LoggedHeader>(
        _ slot: HeaderSlot, after current: UInt64, _ policy: UpdatePolicy, trace: inout OperationTrace, _ transition: (Header) -> Header?
    ) async throws(FabricError) -> UpdateOutcome<Header> {
        guard policy.attemptsMax > 1 else { return .lost(current: current) }
        var rest = policy
        rest.attemptsMax -= 1
        if case .flush = rest.log { rest.log = .keep }
        return try await update(.header(slot, known: current), rest, trace: &trace, transition)
    }

    /// A state change or a flush on one header, as `updateWords` does it, its first
    /// attempt in one `WordBatch` (no array, no heap allocation): a flush's record CAS,
    /// then the header CAS. A transition that refuses the word answers `refused` having
    /// sent nothing, or with `rereadOnRefusal`, nil: the general path rereads the word. A
    /// lost CAS with attempts left is tried again from its answer, the record already sent.
    private func updateFast<Header: LoggedHeader>(
        _ slot: HeaderSlot, known: UInt64?, _ policy: UpdatePolicy, trace: inout OperationTrace, _ transition: (Header) -> Header?
    ) async throws(FabricError) -> UpdateOutcome<Header>? {
        let word = known ?? cache.withShard(of: slot) { $0[slot] }
        guard let target = Header(rawValue: word).flatMap(transition) else {
            return policy.rereadOnRefusal ? nil : .refused(current: word)
        }
        var batch = WordBatch()
        var flushLog: PendingLog?
        if case .flush(let log) = policy.log { flushLog = log }
        let recordCAS = flushLog.map { batch.compareAndSwap($0.recordAddress, expected: $0.recordBefore, desired: $0.record.rawValue, rkey: metadataKey) }
        let headerCAS = batch.compareAndSwap(grant.address(of: slot), expected: word, desired: target.rawValue, rkey: metadataKey)
        trace.batches += 1
        trace.verbs += UInt64(batch.count)
        let ticket = drawTicket()
        do { try await connection(for: trace).post(&batch) } catch {
            markBroken()
            throw error
        }
        if let recordCAS, let flushLog { checkRecordUpdate(flushLog, batch.compareAndSwapAnswer(recordCAS)) }
        let (exchanged, original) = batch.compareAndSwapAnswer(headerCAS)
        cache.withShard(of: slot) { $0.store(exchanged ? target.rawValue : original, at: slot, ticket: ticket) }
        if exchanged {
            noteRoom(of: slot, from: word, to: target.rawValue, trace: &trace)
            return .updated(target)
        }
        trace.retries += 1
        return try await retry(slot, after: original, policy, trace: &trace, transition)
    }

    /// `update` for several headers of one type at once (see `updateWords`).
    func updateEach<Header: LoggedHeader>(
        _ slots: [HeaderSlot], _ policy: UpdatePolicy, requireAll: Bool = false, known: [UInt64]? = nil,
        before: [Verb] = [], after: [Verb] = [], trace: inout OperationTrace, _ transition: (HeaderSlot, Header) -> Header?
    ) async throws(FabricError) -> [UpdateOutcome<Header>] {
        let homes = zip(slots, known.map { $0.map(Optional.some) } ?? Array(repeating: nil, count: slots.count)).map { WordHome.header($0, known: $1) }
        let outcomes = try await updateWords(
            homes, policy, requireAll: requireAll, before: before, after: after, trace: &trace,
            transition: { index, word in Header(rawValue: word).flatMap { transition(slots[index], $0) }?.rawValue },
            flushed: { _, word in Header(rawValue: word)?.flushed()?.rawValue })
        return outcomes.map { $0.map(Header.self) }
    }

    /// `update` of words outside the cache (room summary words, full-log records, intent
    /// slots), each from the value the caller knows, one CAS each in one doorbell,
    /// followed by `after`, whose answers go to `answered` when the doorbell is posted (it
    /// is not when the transition refuses every word). `transition` takes the index of the
    /// word in `words`. Outcomes come in the order of `words`.
    func updateEach(
        words: [(address: RemoteAddress, known: UInt64)], _ policy: UpdatePolicy, after: [Verb] = [], trace: inout OperationTrace,
        answered: ([VerbResult]) -> Void = { _ in }, _ transition: (Int, UInt64) -> UInt64?
    ) async throws(FabricError) -> [UpdateOutcome<RawWord>] {
        try await updateWords(
            words.map { .word($0.address, known: $0.known) }, policy, after: after, trace: &trace, afterAnswered: answered,
            transition: transition, flushed: { _, _ in nil })
    }

    /// The update loop for one or more words, one CAS each in the same doorbell, in the
    /// order of `homes` (after `before` and whatever the log handling adds, followed by
    /// `after` and READs of `alsoRead`, all of which ride the first doorbell only;
    /// `afterAnswered` receives the answers of `after`). A word
    /// whose CAS lost is tried again in the next doorbell, from the answer, up to
    /// `policy.attemptsMax` doorbells. With `requireAll`, a transition refused on any word
    /// sends nothing at all: every word answers `refused`. `transition` and `flushed` (the
    /// word with its pending log flushed; nil when none is pending) take the index of the
    /// word in `homes`. Outcomes come in the order of `homes`.
    private func updateWords(
        _ homes: [WordHome], _ policy: UpdatePolicy, requireAll: Bool = false, before: [Verb] = [], after: [Verb] = [],
        alsoRead: [HeaderSlot] = [], trace: inout OperationTrace, afterAnswered: ([VerbResult]) -> Void = { _ in },
        transition: (Int, UInt64) -> UInt64?, flushed: (Int, UInt64) -> UInt64?
    ) async throws(FabricError) -> [UpdateOutcome<RawWord>] {
        precondition(policy.attemptsMax >= 1, "an update needs at least one attempt")
        var state = UpdateRounds(
            homes: homes, policy: policy, before: before, after: after, alsoRead: alsoRead, trailers: after + alsoRead.map(read),
            known: homes.map { home in
                switch home {
                case .header(let slot, let word): word ?? cache.withShard(of: slot) { $0[slot] }
                case .word(_, let word): word
                }
            })
        if case .flush(let log) = policy.log {
            state.riders.append(recordUpdate(log))
            state.flushLog = log
        }
        defer { if let roomChanged = state.roomChanged { trace.effects.noteRoomChanged(roomChanged) } }
        while state.round < policy.attemptsMax {
            let open = homes.indices.filter { state.outcomes[$0] == nil }
            if open.isEmpty { break }
            let prepared = open.map { prepare(homes[$0], state.known[$0], flushed: flushed($0, state.known[$0]), policy.log) }
            let desired = zip(open, prepared).map { index, prepared in transition(index, prepared.base) }
            if desired.contains(where: { $0 == nil }), state.rereadLeft || requireAll {
                for item in prepared { settle(item, committed: false, trace: &trace) }
                guard state.rereadLeft else {
                    for index in open { state.outcomes[index] = .refused(current: state.known[index]) }
                    break
                }
                try await reread(zip(open, desired).filter { $0.1 == nil }.map(\.0), &state, trace: &trace)
                continue
            }
            let sent = collectSent(open, prepared, desired, &state, trace: &trace)
            if sent.isEmpty { break }
            try await postRound(sent, &state, trace: &trace, afterAnswered: afterAnswered)
        }
        assert(state.round <= policy.attemptsMax, "an update posted more rounds than its policy allows")
        return homes.indices.map { state.outcomes[$0] ?? .refused(current: state.known[$0]) }
    }

    /// A refused transition with `rereadOnRefusal` left: READs the `stale` words (after
    /// the riders, which go out now) into `state.known` and the cache.
    private func reread(_ stale: [Int], _ state: inout UpdateRounds, trace: inout OperationTrace) async throws(FabricError) {
        state.rereadLeft = false
        let reads = stale.map { Verb.readWords(address(of: state.homes[$0]), count: 1, rkey: metadataKey) }
        let (results, ticket) = try await postTicketed(state.riders + reads, trace: &trace)
        checkRecordUpdate(state.flushLog, results.first)
        state.riders = []
        state.flushLog = nil
        for (index, result) in zip(stale, results.suffix(stale.count)) {
            state.known[index] = result.words[0]
            store(state.known[index], at: state.homes[index], ticket: ticket)
        }
    }

    /// The words of this round that go out (those whose transition applies; the others
    /// answer `refused` and give their folded logs back), with the record CAS of each
    /// folded log appended to `state.roundVerbs` after the riders.
    private func collectSent(
        _ open: [Int], _ prepared: [PreparedWord], _ desired: [UInt64?], _ state: inout UpdateRounds, trace: inout OperationTrace
    ) -> [SentWord] {
        state.roundVerbs = state.riders
        var sent: [SentWord] = []
        for (position, index) in open.enumerated() {
            guard let target = desired[position] else {
                settle(prepared[position], committed: false, trace: &trace)
                state.outcomes[index] = .refused(current: state.known[index])
                continue
            }
            var foldIndex: Int?
            if let folded = prepared[position].foldedLog {
                foldIndex = state.roundVerbs.count
                state.roundVerbs.append(recordUpdate(folded.log))
            }
            sent.append(SentWord(index: index, prepared: prepared[position], desired: target, foldIndex: foldIndex))
        }
        return sent
    }

    /// Posts one round: the riders and folded records (`state.roundVerbs`), a CAS per word
    /// of `sent`, the trailers (first round only) and a commit's record READ; then takes
    /// the answers into the cache, the pending table and `state.outcomes`.
    private func postRound(
        _ sent: [SentWord], _ state: inout UpdateRounds, trace: inout OperationTrace, afterAnswered: ([VerbResult]) -> Void
    ) async throws(FabricError) {
        var verbs = state.roundVerbs
        let firstCAS = verbs.count
        for item in sent {
            verbs.append(.compareAndSwap(address(of: state.homes[item.index]), expected: item.prepared.expected, desired: item.desired, rkey: metadataKey))
        }
        verbs += state.trailers
        if case .commit(let record) = state.policy.log { verbs.append(.readWords(record, count: 1, rkey: metadataKey)) }
        let (results, ticket): ([VerbResult], UInt64)
        do { (results, ticket) = try await postTicketed(verbs, trace: &trace) } catch {
            for item in sent { settle(item.prepared, committed: false, trace: &trace) }
            throw error
        }
        checkRecordUpdate(state.flushLog, results.first)
        let trailersStart = firstCAS + sent.count
        if !state.after.isEmpty, state.round == 0 { afterAnswered(Array(results[trailersStart..<trailersStart + state.after.count])) }
        let readsStart = trailersStart + state.trailers.count - state.trailingReads.count
        store(results[readsStart..<readsStart + state.trailingReads.count].map { $0.words[0] }, at: state.trailingReads, ticket: ticket)
        state.endRound()
        for (offset, item) in sent.enumerated() {
            if let foldIndex = item.foldIndex, let folded = item.prepared.foldedLog { checkRecordUpdate(folded.log, results[foldIndex]) }
            take(results[firstCAS + offset].compareAndSwap, of: item, ticket: ticket, recordRead: results.last!, &state, trace: &trace)
        }
    }

    /// Takes the answer of one word's CAS: into the cache and `state.known`, the folded
    /// log settled, the room change noted, and the word's outcome when it committed or
    /// lost its last attempt.
    private func take(
        _ answer: (exchanged: Bool, original: UInt64), of item: SentWord, ticket: UInt64, recordRead: VerbResult,
        _ state: inout UpdateRounds, trace: inout OperationTrace
    ) {
        state.known[item.index] = answer.exchanged ? item.desired : answer.original
        store(state.known[item.index], at: state.homes[item.index], ticket: ticket)
        settle(item.prepared, committed: answer.exchanged, trace: &trace)
        guard answer.exchanged else {
            trace.retries += 1
            if state.round >= state.policy.attemptsMax { state.outcomes[item.index] = .lost(current: state.known[item.index]) }
            return
        }
        if case .header(.section(let section), _) = state.homes[item.index], Self.roomDiffers(item.prepared.expected, item.desired) {
            let changed = state.roomChanged
            state.roomChanged = min(changed?.lowerBound ?? section, section)..<max(changed?.upperBound ?? section + 1, section + 1)
        }
        if case .commit = state.policy.log {
            state.outcomes[item.index] = .committed(RawWord(item.desired), recordBefore: recordRead.words[0])
        } else {
            state.outcomes[item.index] = .updated(RawWord(item.desired))
        }
    }

    // MARK: Parts

    /// The settle rules (`PendingLogTable.prepare` and `settle`), with the cache's lock
    /// held, called through private functions of this file: with the table's methods
    /// called straight from `commitFast`'s critical sections, the optimizer inlined them
    /// into the async function and an allocate+free pair cost some 20 % more CPU at two
    /// tasks (`finemem bench`, immediate mode).
    private static func prepare(_ slot: HeaderSlot, _ word: UInt64, flushed: UInt64?, pending: inout PendingLogTable) -> PreparedWord {
        pending.prepare(slot, word, flushed: flushed)
    }

    private static func settle(_ prepared: PreparedWord, committed: Bool, pending: inout PendingLogTable) {
        pending.settle(prepared, committed: committed)
    }

    /// After a committed CAS on `slot`: a section whose room it changed needs its room
    /// summary bits synced.
    private func noteRoom(of slot: HeaderSlot, from old: UInt64, to new: UInt64, trace: inout OperationTrace) {
        if case .section(let section) = slot, Self.roomDiffers(old, new) { roomChanged(section..<section + 1, trace: &trace) }
    }

    private static func roomDiffers(_ old: UInt64, _ new: UInt64) -> Bool {
        (SectionHeader(rawValue: old)?.hasRoom ?? true) != (SectionHeader(rawValue: new)?.hasRoom ?? true)
    }

    private func store(_ word: UInt64, at home: WordHome, ticket: UInt64) {
        if case .header(let slot, _) = home { cache.withShard(of: slot) { $0.store(word, at: slot, ticket: ticket) } }
    }

    private func address(of home: WordHome) -> RemoteAddress {
        switch home {
        case .header(let slot, _): grant.address(of: slot)
        case .word(let address, _): address
        }
    }

    /// The CAS that puts a pending log's record in the full log: from the value the record
    /// had right after the commit to the operation's record. Records never go backwards:
    /// a flush that comes too late finds another value and changes nothing.
    func recordUpdate(_ log: PendingLog) -> Verb {
        .compareAndSwap(log.recordAddress, expected: log.recordBefore, desired: log.record.rawValue, rkey: metadataKey)
    }

    /// Checks the answer of a record update: it exchanged, or the record already held the
    /// operation's record (recovery wrote it first). Anything else means someone wrote a
    /// record under this node's pending log, which the protocol excludes.
    private func checkRecordUpdate(_ log: PendingLog?, _ result: VerbResult?) {
        guard let log, let result else { return }
        checkRecordUpdate(log, result.compareAndSwap)
    }

    private func checkRecordUpdate(_ log: PendingLog, _ answer: (exchanged: Bool, original: UInt64)) {
        precondition(answer.exchanged || answer.original == log.record.rawValue,
                     "the record at \(log.recordAddress) changed under a pending log of \(owner): expected \(log.recordBefore), found \(answer.original)")
    }

    /// Decides the expected word and the transition's base of a word whose flushed self
    /// is `flushed` (see `LogHandling`).
    private func prepare(_ home: WordHome, _ word: UInt64, flushed: UInt64?, _ handling: LogHandling) -> PreparedWord {
        guard case .commit = handling else { return .plain(word) }
        guard case .header(let slot, _) = home else { preconditionFailure("block operations commit on headers") }
        return cache.withShard(of: slot) { Self.prepare(slot, word, flushed: flushed, pending: &$0.pending) }
    }


    /// After the CAS of a prepared word: a folded log is flushed if the CAS committed;
    /// otherwise the job goes back to the table and someone must flush it.
    private func settle(_ prepared: PreparedWord, committed: Bool, trace: inout OperationTrace) {
        guard let slot = prepared.foldedLog?.slot else { return }
        cache.withShard(of: slot) { Self.settle(prepared, committed: committed, pending: &$0.pending) }
        if !committed { logReturned(slot, trace: &trace) }
    }
}

/// The state of `updateWords` across its rounds (doorbells).
private struct UpdateRounds {
    let homes: [WordHome]
    let policy: UpdatePolicy
    /// `after`, whose answers the caller receives; READs of `alsoRead` go to the cache.
    let after: [Verb]
    /// The words as last seen: cached or given at first, then each CAS's answer.
    var known: [UInt64]
    var outcomes: [UpdateOutcome<RawWord>?]
    /// Verbs before the CASes of the next doorbell (`before`, a flush's record CAS);
    /// they go out once.
    var riders: [Verb]
    /// A flush's log, until its record CAS's answer is checked.
    var flushLog: PendingLog?
    /// Verbs after the CASes of the first doorbell: `after`, then the READs of
    /// `trailingReads`.
    var trailers: [Verb]
    var trailingReads: [HeaderSlot]
    var rereadLeft: Bool
    /// Sections whose room a committed CAS changed.
    var roomChanged: Range<Int>?
    /// Doorbells with CASes posted.
    var round = 0
    /// The verbs of the round being built, before its CASes.
    var roundVerbs: [Verb] = []

    init(homes: [WordHome], policy: UpdatePolicy, before: [Verb], after: [Verb], alsoRead: [HeaderSlot], trailers: [Verb], known: [UInt64]) {
        self.homes = homes
        self.policy = policy
        self.after = after
        self.known = known
        outcomes = Array(repeating: nil, count: homes.count)
        riders = before
        self.trailers = trailers
        trailingReads = alsoRead
        rereadLeft = policy.rereadOnRefusal
    }

    /// After a doorbell: riders and trailers have gone out (they ride the first only).
    mutating func endRound() {
        riders = []
        flushLog = nil
        trailers = []
        trailingReads = []
        round += 1
    }
}

/// A word that goes out in a round: its index in `homes`, the CAS's expected word (and
/// folded log) and desired word, and where its folded log's record CAS sits.
private struct SentWord {
    let index: Int
    let prepared: PreparedWord
    let desired: UInt64
    let foldIndex: Int?
}
