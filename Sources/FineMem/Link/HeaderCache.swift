/// A compute node's cached header words of one memory node, refreshed from READs and
/// from the answer of every CAS (a failed CAS returns the word it found). The cache is a
/// hint for where to look: every remote change is decided by a CAS whose expected value
/// is the cached word, and a decision not to change a word rests on a fresh READ.
///
/// Newer answers win: every answer is stored with the ticket of the batch that carried it
/// (batches of one connection execute in the order their tickets were drawn), and an
/// answer older than the word's stored one is dropped, so that a slow refresh cannot undo
/// what a later CAS showed.
///
/// `busy` holds headers with a CAS of this node in flight, so that tasks of one compute
/// node do not race each other for the same word; `cursor` is where searches start.
///
/// One cache holds the sections `sectionRange` of the pool (a shard of `HeaderCacheShards`,
/// under a lock of its own); every section number it takes or answers is the pool's.
struct HeaderCache: Sendable {
    /// The first section of the shard; the arrays below are indexed from it.
    let base: Int
    private var sections: [UInt64]
    /// The span headers, in pages of `SpanPage.sections` sections, each made on the first
    /// store into it: the cache of a large pool costs memory for the spans it has seen.
    private var spanPages: [SpanPage?]
    /// The ticket of the answer each section word came from (span words: in their page).
    private var versions: [UInt64]
    /// Whether the span headers of a section have been read since start (a section's
    /// spans are read when a search first needs them).
    private var spansRead: [Bool]
    var busy = BusyHeaders()
    /// Where searches start: a section of the shard (`checkInvariants`).
    var cursor: Int
    /// This node's logs not yet flushed, by header: under the cache's lock, so that an
    /// operation reads a word and takes the log on it to fold in one critical section.
    var pending = PendingLogTable()
    /// The summary level: sections where a chunk-layer search may find something (a span
    /// empty in the settled section header, or a chunk-mode span with a free chunk, whose
    /// headers are not read yet, or whose cached header is not open), and sections with an
    /// empty span (where a section-layer search may). Kept from every answer stored, so that a search visits
    /// candidates only, however large the pool: a superset of where room is, never less.
    private var chunkCandidates: SectionBitmap
    private var sectionCandidates: SectionBitmap
    /// The sections of `sectionCandidates` that are not wholly empty (where a span is
    /// opened first, so that whole sections stay free for large blocks).
    private var usedSectionCandidates: SectionBitmap
    #if DEBUG
    /// The sections (from the shard's first) whose words were stored since the last
    /// `checkInvariants`: the ones whose summary bits it checks.
    private var storedSinceCheck: [Int] = []
    #endif

    /// The cache of sections `base..<base + sections.count`, as read (`sections` holds
    /// their words), with searches starting at `cursor` (taken modulo the shard).
    init(sections: [UInt64], base: Int = 0, cursor: Int) {
        precondition(!sections.isEmpty && base >= 0, "a cache holds at least one section")
        self.base = base
        self.sections = sections
        spanPages = Array(repeating: nil, count: (sections.count + SpanPage.sections - 1) / SpanPage.sections)
        spansRead = Array(repeating: false, count: sections.count)
        versions = Array(repeating: 0, count: sections.count)
        self.cursor = base + abs(cursor) % sections.count
        chunkCandidates = SectionBitmap(count: sections.count)
        sectionCandidates = SectionBitmap(count: sections.count)
        usedSectionCandidates = SectionBitmap(count: sections.count)
        for local in sections.indices { summarize(local) }
        debugOnly { checkInvariants(everySection: true) }
    }

    /// The sections this cache holds.
    var sectionRange: Range<Int> { base..<base + sections.count }

    /// Whether the span headers of `section` have been read since start.
    func spansKnown(_ section: Int) -> Bool { spansRead[section - base] }

    /// Whether a chunk-layer search may find something in `section` (see
    /// `chunkCandidates`), and a section-layer one.
    func isChunkCandidate(_ section: Int) -> Bool { chunkCandidates[section - base] }
    func isSectionCandidate(_ section: Int) -> Bool { sectionCandidates[section - base] }

    /// The sections where a chunk-layer search may find something, from the cursor on
    /// (circular, each once).
    var chunkCandidateSections: CandidateSections { CandidateSections(chunkCandidates, base: base, cursor: cursor) }
    /// The sections with an empty span, from the cursor on; `used`: only those not wholly
    /// empty.
    func sectionCandidateSections(used: Bool = false) -> CandidateSections {
        CandidateSections(used ? usedSectionCandidates : sectionCandidates, base: base, cursor: cursor)
    }

    /// The set sections of a summary bitmap of a shard, as the pool's section numbers.
    struct CandidateSections: IteratorProtocol {
        private var bits: SectionBitmap.CircularBits
        private let base: Int

        fileprivate init(_ bitmap: SectionBitmap, base: Int, cursor: Int) {
            bits = bitmap.circular(from: cursor - base)
            self.base = base
        }

        mutating func next() -> Int? { bits.next().map { base + $0 } }
    }

    /// What the upkeep worker does with the item of `slot` it picked up (queued for the log
    /// with `serial`, put back `deferrals` times), see `UpkeepItem`.
    enum UpkeepPick {
        /// Flush whatever log is there (the header went without an operation since).
        case flush
        /// The header is in use: put the item back for later, for the log `serial` now
        /// there.
        case later(serial: UInt64)
        /// The header has been in use for too long: flush, and give other nodes a turn
        /// (this node's searches pass the header by until `turnEnds`).
        case flushForTurn
    }

    mutating func pickUpkeep(_ slot: HeaderSlot, queuedFor serial: UInt64, mayDefer: Bool, turnEnds: UInt64) -> UpkeepPick {
        if let log = pending.logInUse(slot, queuedFor: serial) {
            if mayDefer { return .later(serial: log.serial) }
            busy.beginTurn(slot, until: turnEnds)
            pending.upkeepPicked(slot)
            return .flushForTurn
        }
        pending.upkeepPicked(slot)
        return .flush
    }

    /// Whether a block operation on the header at `slot` would wait for someone's flush:
    /// the cached word carries a pending log that is not this node's queued one (which a
    /// commit folds in). Searches rank such headers after clean ones.
    func waitsForFlush<Header: LoggedHeader>(_ type: Header.Type, _ slot: HeaderSlot) -> Bool {
        (Header(rawValue: self[slot])?.logPending ?? false) && !pending.isQueued(slot)
    }

    subscript(slot: HeaderSlot) -> UInt64 {
        switch slot {
        case .section(let section): sections[section - base]
        case .span(let section, let span): spanWord(section: section - base, span: span)
        }
    }

    /// The span word of the shard's `section`-th section (local numbering, as below).
    private func spanWord(section: Int, span: Int) -> UInt64 {
        spanPages[section / SpanPage.sections]?.words[SpanPage.index(section: section, span: span)] ?? SpanHeader.empty.rawValue
    }

    /// Stores `word`, the answer of the batch with `ticket`, unless the cache holds an
    /// answer of a later batch.
    mutating func store(_ word: UInt64, at slot: HeaderSlot, ticket: UInt64) {
        if storeWord(word, at: slot, ticket: ticket) { summarize(slot.section - base) }
    }

    /// `store` without the summary (the caller summarizes); answers whether it stored.
    /// (From here on, sections are numbered from the shard's first.)
    private mutating func storeWord(_ word: UInt64, at slot: HeaderSlot, ticket: UInt64) -> Bool {
        switch slot {
        case .section(let section): storeWord(word, atLocal: section - base, span: nil, ticket: ticket)
        case .span(let section, let span): storeWord(word, atLocal: section - base, span: span, ticket: ticket)
        }
    }

    /// Stores `word` unless the cached one came with a later ticket; with `whatever`, in
    /// any case (keeping the later ticket).
    private mutating func storeWord(_ word: UInt64, atLocal section: Int, span: Int?, ticket: UInt64, whatever: Bool = false) -> Bool {
        #if DEBUG
        storedSinceCheck.append(section)
        #endif
        switch span {
        case nil:
            guard whatever || ticket >= versions[section] else { return false }
            versions[section] = max(versions[section], ticket)
            sections[section] = word
        case let span?:
            let page = section / SpanPage.sections
            let index = SpanPage.index(section: section, span: span)
            if spanPages[page] == nil { spanPages[page] = SpanPage() }
            guard whatever || ticket >= spanPages[page]!.versions[index] else { return false }
            spanPages[page]!.versions[index] = max(spanPages[page]!.versions[index], ticket)
            spanPages[page]!.words[index] = word
        }
        return true
    }

    /// Recomputes the summary bits of the shard's `section`-th section from its cached
    /// words.
    private mutating func summarize(_ section: Int) {
        let bits = summary(of: section)
        chunkCandidates[section] = bits.chunk
        sectionCandidates[section] = bits.section
        usedSectionCandidates[section] = bits.usedSection
    }

    /// The summary bits of the shard's `section`-th section, from its cached words.
    @inline(__always)
    private func summary(of section: Int) -> (chunk: Bool, section: Bool, usedSection: Bool) {
        var chunkCandidate = false
        var sectionCandidate = false
        var used = false
        if let header = SectionHeader(rawValue: sections[section])?.settled {
            used = !header.isAllEmpty
            for span in 0..<PoolGeometry.spansPerSection {
                switch header.state(ofSpan: span) {
                case .whole: continue
                case .empty: sectionCandidate = true
                case .chunks, .chunksAvoid:
                    guard !chunkCandidate else { continue }
                    if !spansRead[section] {
                        chunkCandidate = true
                    } else if let spanHeader = SpanHeader(rawValue: spanWord(section: section, span: span))?.settled,
                              spanHeader.mode != .open || spanHeader.firstFreeRun(countLog2: 0) != nil {
                        // A span header not open under a chunk-mode entry is stale or in
                        // the middle of an open or close: its room is unknown, not absent.
                        chunkCandidate = true
                    }
                }
                if sectionCandidate && chunkCandidate { break }
            }
        }
        return (chunkCandidate, sectionCandidate, sectionCandidate && used)
    }

    /// Stores the span headers of `section` as just read.
    mutating func storeSpans(of section: Int, _ words: [UInt64], ticket: UInt64) {
        precondition(words.count == PoolGeometry.spansPerSection, "a section has \(PoolGeometry.spansPerSection) spans, not \(words.count)")
        let local = section - base
        spansRead[local] = true
        for (span, word) in words.enumerated() { _ = storeWord(word, atLocal: local, span: span, ticket: ticket) }
        summarize(local)
        debugOnly { checkInvariants() }
    }

    /// Stores every header of the shard as just read: `poolSections` and `poolSpans` are
    /// the whole pool's. Every word is stored, whatever ticket the cached one came with:
    /// the answer that the pool is full rests on this read (`noRoomInCache`), and an
    /// answer with a later ticket may have executed before it (on another queue pair of
    /// the node, or posted by a thread that drew its ticket first and posted last), so
    /// dropping the read's word could hide room it saw. A word it overwrites with an older
    /// one is only stale: a CAS from it fails and brings the current word.
    /// The span words of a section the read did not read (one held whole) are forgotten:
    /// they count as not read (`spansKnown`), and hold the word of a span never used, as
    /// at start. A search reads them when it first needs them, and one that opens a span
    /// there expects that word (its CAS loses once, to the current word, when the span was
    /// used): a word kept from an earlier read could say the span is open, and the search
    /// would pass it by without sending anything, again and again.
    mutating func storeAll(_ read: FullRead, ticket: UInt64) {
        precondition(read.sections.count >= base + sections.count, "a refresh reads every header")
        for local in sections.indices {
            let section = base + local
            _ = storeWord(read.sections[section], atLocal: local, span: nil, ticket: ticket, whatever: true)
            spansRead[local] = read.spansRead[section]
            for span in 0..<PoolGeometry.spansPerSection {
                let word = read.spansRead[section] ? read.spans[section * PoolGeometry.spansPerSection + span] : SpanHeader.empty.rawValue
                _ = storeWord(word, atLocal: local, span: span, ticket: ticket, whatever: true)
            }
            summarize(local)
        }
        debugOnly { checkInvariants(everySection: true) }
    }

    /// The settled header at `slot`, or nil when the cached word does not decode.
    func settled<Header: LoggedHeader>(_ type: Header.Type, _ slot: HeaderSlot) -> Header? {
        Header(rawValue: self[slot])?.settled
    }

    /// The structural rules of the cache: every array sized by the section count, the
    /// cursor, every busy header and every pending log inside the shard.
    /// Checks the cache's invariants (debug builds): its arrays agree, the cursor lies in
    /// the shard, the summary bits of each section stored since the last check (of every
    /// section, with `everySection`) are those its words give, and with `tables`, the
    /// pending logs and busy marks lie in the shard. Checking what changed keeps a check
    /// per operation cheap on a large pool.
    mutating func checkInvariants(everySection: Bool = false, tables: Bool = true) {
        let sectionCount = sections.count
        precondition(sectionCount >= 1, "a pool has at least one section")
        precondition(spanPages.count == (sectionCount + SpanPage.sections - 1) / SpanPage.sections && spansRead.count == sectionCount, "cache arrays disagree")
        precondition(versions.count == sectionCount, "one version per cached section word")
        precondition(sectionRange.contains(cursor), "cursor \(cursor) outside \(sectionRange)")
        #if DEBUG
        let stored = everySection ? Array(0..<sectionCount) : storedSinceCheck
        storedSinceCheck.removeAll(keepingCapacity: true)
        for section in stored {
            let bits = summary(of: section)
            precondition(bits == (chunkCandidates[section], sectionCandidates[section], usedSectionCandidates[section]), "summary of section \(section) is stale")
        }
        #endif
        guard tables else { return }
        pending.forEachSlot { slot in precondition(sectionRange.contains(slot.section), "pending log of \(slot) outside \(sectionRange)") }
        for slot in busy {
            switch slot {
            case .section(let section): precondition(sectionRange.contains(section), "busy \(slot) outside \(sectionRange)")
            case .span(let section, let span):
                precondition(sectionRange.contains(section) && span >= 0 && span < PoolGeometry.spansPerSection, "busy \(slot) outside \(sectionRange)")
            }
        }
    }
}

/// The headers with a CAS of this node in flight: a handful at most (one per task of the
/// node), so a small array, searched without hashing.
struct BusyHeaders: Sendable, Sequence {
    private var slots: [HeaderSlot] = []
    /// Headers in other nodes' turn (`beginTurn`), and when it ends: searches pass them
    /// by, and a free of a block there waits for the turn to end (`insertOutsideTurn`).
    private var turns: [(slot: HeaderSlot, until: UInt64)] = []

    init() { slots.reserveCapacity(16) }

    /// Whether a search must pass `slot` by: a CAS of this node is in flight on it, or it
    /// is other nodes' turn.
    func contains(_ slot: HeaderSlot) -> Bool {
        (!slots.isEmpty && slots.contains(slot)) || (!turns.isEmpty && turns.contains { $0.slot == slot })
    }

    /// Marks `slot` busy; answers false when a CAS of this node is in flight on it.
    @discardableResult
    mutating func insert(_ slot: HeaderSlot) -> Bool {
        guard slots.isEmpty || !slots.contains(slot) else { return false }
        slots.append(slot)
        return true
    }

    /// Marks `slot` busy unless a CAS of this node is in flight on it or it is other
    /// nodes' turn (turns over by `now` end first).
    mutating func insertOutsideTurn(_ slot: HeaderSlot, now: UInt64) -> Bool {
        if !turns.isEmpty {
            endTurns(through: now)
            if turns.contains(where: { $0.slot == slot }) { return false }
        }
        return insert(slot)
    }

    /// Other nodes' turn on `slot` begins: this node's searches pass it by until `until`
    /// (ended by the first search after it, `endTurns`).
    mutating func beginTurn(_ slot: HeaderSlot, until: UInt64) {
        turns.removeAll { $0.slot == slot }
        turns.append((slot, until))
    }

    /// Whether some header is in other nodes' turn.
    var hasTurns: Bool { !turns.isEmpty }

    /// Ends the turns whose time is up by `now`.
    mutating func endTurns(through now: UInt64) { turns.removeAll { $0.until <= now } }

    mutating func remove(_ slot: HeaderSlot) {
        if let index = slots.firstIndex(of: slot) { slots.swapAt(index, slots.count - 1); slots.removeLast() }
    }

    func makeIterator() -> IndexingIterator<[HeaderSlot]> { slots.makeIterator() }
}

/// One bit per section, with a circular search for the next set bit: the summary level of
/// a `HeaderCache`.
struct SectionBitmap: Sendable {
    private var words: [UInt64]
    let count: Int

    init(count: Int) {
        self.count = count
        words = Array(repeating: 0, count: (count + 63) / 64)
    }

    subscript(index: Int) -> Bool {
        get { words[index >> 6] & (1 << UInt64(index & 63)) != 0 }
        set {
            if newValue { words[index >> 6] |= 1 << UInt64(index & 63) } else { words[index >> 6] &= ~(1 << UInt64(index & 63)) }
        }
    }

    /// The first set bit at or after `start` (wrapping around once), or nil.
    func next(from start: Int) -> Int? {
        guard count > 0 else { return nil }
        let start = start % count
        if let found = firstSet(in: start..<count) { return found }
        return firstSet(in: 0..<start)
    }

    /// The first set bit in `range`.
    private func firstSet(in range: Range<Int>) -> Int? {
        var index = range.lowerBound
        while index < range.upperBound {
            let word = words[index >> 6] >> UInt64(index & 63)
            if word != 0 {
                let found = index + word.trailingZeroBitCount
                return found < range.upperBound ? found : nil
            }
            index = (index | 63) + 1
        }
        return nil
    }

    /// The set bits in circular order from `start`, each once.
    func circular(from start: Int) -> CircularBits { CircularBits(self, from: start) }

    /// An iterator over the set bits of a bitmap (a copy of it) in circular order.
    struct CircularBits: IteratorProtocol {
        private let bitmap: SectionBitmap
        private let start: Int
        private var position: Int
        private var wrapped = false
        private var done: Bool

        fileprivate init(_ bitmap: SectionBitmap, from start: Int) {
            self.bitmap = bitmap
            done = bitmap.count == 0
            self.start = done ? 0 : start % bitmap.count
            position = self.start
        }

        mutating func next() -> Int? {
            while !done {
                let found: Int?
                if !wrapped {
                    found = bitmap.firstSet(in: position..<bitmap.count)
                    if found == nil { wrapped = true; position = 0; continue }
                } else {
                    found = bitmap.firstSet(in: position..<start)
                }
                guard let section = found else { break }
                position = section + 1
                if !wrapped, position >= bitmap.count { wrapped = true; position = 0 }
                return section
            }
            done = true
            return nil
        }
    }
}

/// The span headers of `sections` consecutive sections in a `HeaderCache`, with the
/// ticket of the answer each came from.
struct SpanPage: Sendable {
    static let sections = 64
    var words = Array(repeating: SpanHeader.empty.rawValue, count: SpanPage.sections * PoolGeometry.spansPerSection)
    var versions = Array(repeating: UInt64(0), count: SpanPage.sections * PoolGeometry.spansPerSection)

    static func index(section: Int, span: Int) -> Int { (section % sections) * PoolGeometry.spansPerSection + span }
}
