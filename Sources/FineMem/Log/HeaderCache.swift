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
    private var spans: [UInt64]
    /// The ticket of the answer each word came from, sections then spans.
    private var versions: [UInt64]
    /// Whether the span headers of a section have been read since start (a section's
    /// spans are read when a search first needs them).
    private(set) var spansKnown: [Bool]
    var busy = BusyHeaders()
    var cursor: Int

    init(sections: [UInt64], cursor: Int) {
        self.sections = sections
        spans = Array(repeating: SpanHeader.empty.rawValue, count: sections.count * PoolGeometry.spansPerSection)
        spansKnown = Array(repeating: false, count: sections.count)
        versions = Array(repeating: 0, count: sections.count * (1 + PoolGeometry.spansPerSection))
        self.cursor = cursor % max(1, sections.count)
        debugOnly { checkInvariants() }
    }

    var sectionCount: Int { sections.count }

    subscript(slot: HeaderSlot) -> UInt64 {
        switch slot {
        case .section(let section): sections[section]
        case .span(let section, let span): spans[section * PoolGeometry.spansPerSection + span]
        }
    }

    private func versionIndex(_ slot: HeaderSlot) -> Int {
        switch slot {
        case .section(let section): section
        case .span(let section, let span): sections.count + section * PoolGeometry.spansPerSection + span
        }
    }

    /// Stores `word`, the answer of the batch with `ticket`, unless the cache holds an
    /// answer of a later batch.
    mutating func store(_ word: UInt64, at slot: HeaderSlot, ticket: UInt64) {
        let index = versionIndex(slot)
        guard ticket >= versions[index] else { return }
        versions[index] = ticket
        switch slot {
        case .section(let section): sections[section] = word
        case .span(let section, let span): spans[section * PoolGeometry.spansPerSection + span] = word
        }
    }

    /// Stores the span headers of `section` as just read.
    mutating func storeSpans(of section: Int, _ words: [UInt64], ticket: UInt64) {
        precondition(words.count == PoolGeometry.spansPerSection, "a section has \(PoolGeometry.spansPerSection) spans, not \(words.count)")
        for (span, word) in words.enumerated() { store(word, at: .span(section: section, span: span), ticket: ticket) }
        spansKnown[section] = true
        debugOnly { checkInvariants() }
    }

    /// Stores every header as just read.
    mutating func storeAll(sections newSections: [UInt64], spans newSpans: [UInt64], ticket: UInt64) {
        precondition(newSections.count == sections.count && newSpans.count == spans.count, "a refresh reads every header")
        for (section, word) in newSections.enumerated() { store(word, at: .section(section), ticket: ticket) }
        for (index, word) in newSpans.enumerated() {
            store(word, at: .span(section: index / PoolGeometry.spansPerSection, span: index % PoolGeometry.spansPerSection), ticket: ticket)
        }
        spansKnown = Array(repeating: true, count: sections.count)
        debugOnly { checkInvariants() }
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
        precondition(spans.count == sectionCount * PoolGeometry.spansPerSection && spansKnown.count == sectionCount, "cache arrays disagree")
        precondition(versions.count == sections.count + spans.count, "one version per cached word")
        precondition(cursor >= 0 && cursor < sectionCount, "cursor \(cursor) outside \(sectionCount) sections")
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
