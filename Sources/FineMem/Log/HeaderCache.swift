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
struct HeaderCache: Sendable {
    private(set) var sections: [UInt64]
    /// The span headers, in pages of `SpanPage.sections` sections, each made on the first
    /// store into it: the cache of a large pool costs memory for the spans it has seen.
    private var spanPages: [SpanPage?]
    /// The ticket of the answer each section word came from (span words: in their page).
    private var versions: [UInt64]
    /// Whether the span headers of a section have been read since start (a section's
    /// spans are read when a search first needs them).
    private(set) var spansKnown: [Bool]
    var busy = BusyHeaders()
    var cursor: Int
    /// This node's logs not yet flushed, by header: under the cache's lock, so that an
    /// operation reads a word and takes the log on it to fold in one critical section.
    var pending = PendingLogTable()
    /// The summary level: sections where a chunk-layer search may find something (a span
    /// empty in the settled section header, or a chunk-mode span with a free chunk, whose
    /// headers are not read yet, or whose cached header is not open), and sections with an
    /// empty span (where a section-layer search may). Kept from every answer stored, so that a search visits
    /// candidates only, however large the pool: a superset of where room is, never less.
    private(set) var chunkCandidates: SectionBitmap
    private(set) var sectionCandidates: SectionBitmap
    /// The sections of `sectionCandidates` that are not wholly empty (where a span is
    /// opened first, so that whole sections stay free for large blocks).
    private(set) var usedSectionCandidates: SectionBitmap

    init(sections: [UInt64], cursor: Int) {
        self.sections = sections
        spanPages = Array(repeating: nil, count: (sections.count + SpanPage.sections - 1) / SpanPage.sections)
        spansKnown = Array(repeating: false, count: sections.count)
        versions = Array(repeating: 0, count: sections.count)
        self.cursor = cursor % max(1, sections.count)
        chunkCandidates = SectionBitmap(count: sections.count)
        sectionCandidates = SectionBitmap(count: sections.count)
        usedSectionCandidates = SectionBitmap(count: sections.count)
        for section in sections.indices { summarize(section) }
        debugOnly { checkInvariants() }
    }

    var sectionCount: Int { sections.count }

    /// Whether a block operation on the header at `slot` would wait for someone's flush:
    /// the cached word carries a pending log that is not this node's queued one (which a
    /// commit folds in). Searches rank such headers after clean ones.
    func waitsForFlush<Header: LoggedHeader>(_ type: Header.Type, _ slot: HeaderSlot) -> Bool {
        (Header(rawValue: self[slot])?.logPending ?? false) && !pending.isQueued(slot)
    }

    subscript(slot: HeaderSlot) -> UInt64 {
        switch slot {
        case .section(let section): sections[section]
        case .span(let section, let span): spanWord(section: section, span: span)
        }
    }

    private func spanWord(section: Int, span: Int) -> UInt64 {
        spanPages[section / SpanPage.sections]?.words[SpanPage.index(section: section, span: span)] ?? SpanHeader.empty.rawValue
    }

    /// Stores `word`, the answer of the batch with `ticket`, unless the cache holds an
    /// answer of a later batch.
    mutating func store(_ word: UInt64, at slot: HeaderSlot, ticket: UInt64) {
        if storeWord(word, at: slot, ticket: ticket) { summarize(slot.section) }
    }

    /// `store` without the summary (the caller summarizes); answers whether it stored.
    private mutating func storeWord(_ word: UInt64, at slot: HeaderSlot, ticket: UInt64) -> Bool {
        switch slot {
        case .section(let section):
            guard ticket >= versions[section] else { return false }
            versions[section] = ticket
            sections[section] = word
        case .span(let section, let span):
            let page = section / SpanPage.sections
            let index = SpanPage.index(section: section, span: span)
            if spanPages[page] == nil { spanPages[page] = SpanPage() }
            guard ticket >= spanPages[page]!.versions[index] else { return false }
            spanPages[page]!.versions[index] = ticket
            spanPages[page]!.words[index] = word
        }
        return true
    }

    /// Recomputes the summary bits of `section` from its cached words.
    private mutating func summarize(_ section: Int) {
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
                    if !spansKnown[section] {
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
        chunkCandidates[section] = chunkCandidate
        sectionCandidates[section] = sectionCandidate
        usedSectionCandidates[section] = sectionCandidate && used
    }

    /// Stores the span headers of `section` as just read.
    mutating func storeSpans(of section: Int, _ words: [UInt64], ticket: UInt64) {
        precondition(words.count == PoolGeometry.spansPerSection, "a section has \(PoolGeometry.spansPerSection) spans, not \(words.count)")
        spansKnown[section] = true
        for (span, word) in words.enumerated() { _ = storeWord(word, at: .span(section: section, span: span), ticket: ticket) }
        summarize(section)
        debugOnly { checkInvariants() }
    }

    /// Stores every header as just read.
    mutating func storeAll(sections newSections: [UInt64], spans newSpans: [UInt64], ticket: UInt64) {
        precondition(newSections.count == sections.count && newSpans.count == sections.count * PoolGeometry.spansPerSection, "a refresh reads every header")
        spansKnown = Array(repeating: true, count: sections.count)
        for (section, word) in newSections.enumerated() { _ = storeWord(word, at: .section(section), ticket: ticket) }
        for (index, word) in newSpans.enumerated() {
            _ = storeWord(word, at: .span(section: index / PoolGeometry.spansPerSection, span: index % PoolGeometry.spansPerSection), ticket: ticket)
        }
        for section in sections.indices { summarize(section) }
        debugOnly { checkInvariants() }
    }

    /// Whether a cached section is held whole under a pending multi-section claim: a claim
    /// in flight, which may yet lose a race on another of its sections and roll back,
    /// giving this one back. (A scan of every section: for the "no room" answer only.)
    var holdsRunClaimInFlight: Bool {
        sections.contains { word in
            guard let header = SectionHeader(rawValue: word), header.logPending else { return false }
            return header.log.sizeCode == SectionHeader.multiSectionSizeCode && header.logDescribesAllocation
        }
    }

    /// The settled header at `slot`, or nil when the cached word does not decode.
    func settled<Header: LoggedHeader>(_ type: Header.Type, _ slot: HeaderSlot) -> Header? {
        Header(rawValue: self[slot])?.settled
    }

    /// The structural rules of the cache: every array sized by the section count, the
    /// cursor and every busy header inside the pool.
    func checkInvariants() {
        let sectionCount = sections.count
        precondition(sectionCount >= 1, "a pool has at least one section")
        precondition(spanPages.count == (sectionCount + SpanPage.sections - 1) / SpanPage.sections && spansKnown.count == sectionCount, "cache arrays disagree")
        precondition(versions.count == sectionCount, "one version per cached section word")
        precondition(cursor >= 0 && cursor < sectionCount, "cursor \(cursor) outside \(sectionCount) sections")
        var copy = self
        for section in 0..<sectionCount {
            let bits = (chunkCandidates[section], sectionCandidates[section], usedSectionCandidates[section])
            copy.summarize(section)
            precondition(bits == (copy.chunkCandidates[section], copy.sectionCandidates[section], copy.usedSectionCandidates[section]),
                         "summary of section \(section) is stale")
        }
        for slot in busy {
            switch slot {
            case .section(let section): precondition(section >= 0 && section < sectionCount, "busy \(slot) outside the pool")
            case .span(let section, let span):
                precondition(section >= 0 && section < sectionCount && span >= 0 && span < PoolGeometry.spansPerSection, "busy \(slot) outside the pool")
            }
        }
    }
}

/// The headers with a CAS of this node in flight: a handful at most (one per task of the
/// node), so a small array, searched without hashing.
struct BusyHeaders: Sendable, Sequence {
    private var slots: [HeaderSlot] = []

    init() { slots.reserveCapacity(16) }

    func contains(_ slot: HeaderSlot) -> Bool { !slots.isEmpty && slots.contains(slot) }

    /// Marks `slot` busy; answers false when it already was.
    @discardableResult
    mutating func insert(_ slot: HeaderSlot) -> Bool {
        guard !contains(slot) else { return false }
        slots.append(slot)
        return true
    }

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
