/// The header of one section (16 spans, 2 MiB): the state of each span and a temporary
/// log of section-layer block operations.
///
/// ```
///  63 61 60    55 54          41 40   38 37  34  33   32   31                      0
/// +-----+--------+--------------+-------+------+----+-----+-------------------------+
/// | 000 | log seq|  log owner   |  log  | log  |pend|cont-| span states, 2 bits each |
/// |     |  (6)   |    (14)      | size  |offset| ing|ended| span i at bits 2i..2i+1  |
/// |     |        |              |code(3)| (4)  |(1) | (1) |                         |
/// +-----+--------+--------------+-------+------+----+-----+-------------------------+
/// ```
///
/// Span states: `empty` (00: free, its span header closed or closing), `chunks` (01: in
/// chunk mode), `chunksAvoid` (10: in chunk mode, but full or contended: a hint for
/// searches), `whole` (11: held whole by a section-layer or multi-section block).
/// Log size code 0-4: a block of 2^code spans at `offset`; code 5: this whole section is
/// part of a multi-section block whose first chunk's full-log record gives its size.
/// `logPending` works as in `SpanHeader`: block operations (claim, release) require it
/// clear and set it; span-state changes (open, close, hints) keep the log as it is.
package struct SectionHeader: RawRepresentable, Hashable, Sendable {
    package enum SpanState: UInt64, Sendable, CaseIterable {
        case empty = 0, chunks = 1, chunksAvoid = 2, whole = 3
        package var isChunkMode: Bool { self == .chunks || self == .chunksAvoid }
    }

    package static let spanCount = 16
    package static let unitChunkCountLog2 = 5
    package static let unitCount = 16
    package static let countLog2Max = 4
    package static let multiSectionSizeCode: UInt8 = 5
    static let statesField = BitField(0, 32)
    static let contendedField = BitField(32, 1)
    static let pendingField = BitField(33, 1)
    static let sizeField = BitField(38, 3)
    static let logFields = LogFieldLayout(offset: BitField(34, 4), sizeCode: sizeField, owner: BitField(41, 14), sequence: BitField(55, 6))
    static let reservedField = BitField(61, 3)

    package private(set) var rawValue: UInt64

    package init?(rawValue: UInt64) {
        guard Self.reservedField.get(rawValue) == 0, Self.sizeField.get(rawValue) <= 5 else { return nil }
        self.rawValue = rawValue
        guard isValid else { return nil }
    }

    package static let empty = SectionHeader(states: 0, contended: false, logPending: false, log: .empty)

    init(states: UInt32, contended: Bool, logPending: Bool, log: TemporaryLog) {
        precondition(log.offset < 16 && log.sizeCode <= 5, "log \(log) does not fit a section")
        var word: UInt64 = 0
        Self.statesField.set(&word, UInt64(states))
        Self.contendedField.set(&word, contended ? 1 : 0)
        Self.pendingField.set(&word, logPending ? 1 : 0)
        Self.logFields.encode(log, into: &word)
        rawValue = word
    }

    /// A header with the given span states and fields.
    package init(spanStates: [SpanState], contended: Bool, logPending: Bool, log: TemporaryLog) {
        precondition(spanStates.count == 16, "a section has 16 spans")
        var states: UInt32 = 0
        for (i, state) in spanStates.enumerated() { states |= UInt32(state.rawValue) << (2 * UInt32(i)) }
        self.init(states: states, contended: contended, logPending: logPending, log: log)
    }

    var states: UInt32 { UInt32(Self.statesField.get(rawValue)) }
    package func state(ofSpan span: Int) -> SpanState {
        SpanState(rawValue: UInt64(states >> (2 * UInt32(span)) & 3))!
    }
    package var spanStates: [SpanState] { (0..<16).map(state(ofSpan:)) }
    package var contended: Bool { Self.contendedField.get(rawValue) == 1 }
    package var logPending: Bool { Self.pendingField.get(rawValue) == 1 }
    package var log: TemporaryLog { Self.logFields.decode(rawValue) }

    /// A multi-section log covers the whole section; others are aligned inside it.
    package var isValid: Bool {
        let log = log
        if log.sizeCode == Self.multiSectionSizeCode { return log.offset == 0 }
        return Int(log.offset) % (1 << log.sizeCode) == 0
    }

    package var isAllEmpty: Bool { states == 0 }

    /// Whether the section word `word` has an entry in chunk mode (01 or 10); false for a
    /// word that does not decode.
    package static func hasChunkModeEntry(_ word: UInt64) -> Bool {
        guard let header = SectionHeader(rawValue: word) else { return false }
        return (header.states ^ header.states >> 1) & 0x5555_5555 != 0
    }
    package var isAllWhole: Bool { states == ~0 }
    package var emptySpanCount: Int { (0..<16).count { state(ofSpan: $0) == .empty } }

    /// The run of spans the log describes.
    package var logSpanRange: Range<Int> {
        let log = log
        if log.sizeCode == Self.multiSectionSizeCode { return 0..<16 }
        return Int(log.offset)..<Int(log.offset) + (1 << log.sizeCode)
    }

    /// Whether every span of `run` is held whole.
    package func marksAllocated(_ run: HeaderRun) -> Bool { run.units.allSatisfy { state(ofSpan: $0) == .whole } }

    /// Whether every span of `run` is empty.
    package func marksFree(_ run: HeaderRun) -> Bool { states & Self.runMask(run) == 0 }

    /// Whether the pending (or last) log describes an allocation: its spans are all whole.
    package var logDescribesAllocation: Bool { logSpanRange.allSatisfy { state(ofSpan: $0) == .whole } }

    /// The mask of a run's 2-bit span states.
    static func runMask(_ run: HeaderRun) -> UInt32 {
        let bits = 2 * run.count
        return (bits == 32 ? ~0 : (UInt32(1) << UInt32(bits)) - 1) << (2 * UInt32(run.offset))
    }

    /// The lowest aligned run of `2^countLog2` empty spans, if any.
    package func firstFreeRun(countLog2: Int) -> HeaderRun? {
        guard countLog2 >= 0, countLog2 <= Self.countLog2Max else { return nil }
        // An empty span's 2-bit state is 0.
        let empty = ~(states | states >> 1) & 0x5555_5555
        return lowestFreeAlignedRun(free: empty, unitBits: 2, countLog2: countLog2).map { HeaderRun(offset: $0, countLog2: countLog2) }
    }

    // MARK: Transitions

    private func setting(_ run: HeaderRun, to state: SpanState) -> UInt32 {
        var newStates = states & ~Self.runMask(run)
        for span in run.units { newStates |= UInt32(state.rawValue) << (2 * UInt32(span)) }
        return newStates
    }

    private func committing(states newStates: UInt32, offset: Int, sizeCode: Int, owner: OwnerID) -> SectionHeader {
        SectionHeader(
            states: newStates, contended: contended, logPending: true,
            log: TemporaryLog(offset: UInt8(offset), sizeCode: UInt8(sizeCode), owner: owner, sequence: log.sequence.next))
    }

    /// Claims the empty spans of `run` whole: a section-layer allocation.
    package func claiming(_ run: HeaderRun, owner: OwnerID) -> SectionHeader? {
        guard !logPending, Self.holds(run), marksFree(run) else { return nil }
        return committing(states: setting(run, to: .whole), offset: run.offset, sizeCode: run.countLog2, owner: owner)
    }

    /// Releases the whole spans of `run`.
    package func releasing(_ run: HeaderRun, owner: OwnerID) -> SectionHeader? {
        guard !logPending, Self.holds(run), marksAllocated(run) else { return nil }
        return committing(states: setting(run, to: .empty), offset: run.offset, sizeCode: run.countLog2, owner: owner)
    }

    /// Claims this whole, empty section as part of a multi-section block.
    package func claimingForMultiSection(owner: OwnerID) -> SectionHeader? {
        guard !logPending, isAllEmpty else { return nil }
        return committing(states: ~0, offset: 0, sizeCode: Int(Self.multiSectionSizeCode), owner: owner)
    }

    /// Releases this section from a multi-section block.
    package func releasingFromMultiSection(owner: OwnerID) -> SectionHeader? {
        guard !logPending, isAllWhole else { return nil }
        return committing(states: 0, offset: 0, sizeCode: Int(Self.multiSectionSizeCode), owner: owner)
    }

    /// Marks the pending log as written to the full log.
    package func flushed() -> SectionHeader? {
        guard logPending else { return nil }
        return SectionHeader(states: states, contended: contended, logPending: false, log: log)
    }

    /// Whether the pending log covers `span`: a section-layer block or a multi-section
    /// block whose record is not written yet. Such a span may not enter chunk mode until the
    /// log is flushed: a chunk-layer block there would start at a chunk whose record the
    /// pending log is yet to write.
    package func pendingLogCovers(span: Int) -> Bool { logPending && logSpanRange.contains(span) }

    /// Puts an empty span into chunk mode (sent with the span header's `markingOpening`).
    package func openingSpan(_ span: Int) -> SectionHeader? {
        guard state(ofSpan: span) == .empty, !pendingLogCovers(span: span) else { return nil }
        return SectionHeader(states: setting(.unit(span), to: .chunks), contended: contended, logPending: logPending, log: log)
    }

    /// Returns a closing span to empty (its span header is `closing`).
    package func closingSpan(_ span: Int) -> SectionHeader? {
        guard state(ofSpan: span).isChunkMode else { return nil }
        return SectionHeader(states: setting(.unit(span), to: .empty), contended: contended, logPending: logPending, log: log)
    }

    /// Sets the search hint of a chunk-mode span: avoid (full or contended) or normal.
    package func hintingSpan(_ span: Int, avoid: Bool) -> SectionHeader? {
        let current = state(ofSpan: span)
        guard current.isChunkMode else { return nil }
        let target: SpanState = avoid ? .chunksAvoid : .chunks
        guard current != target else { return nil }
        return SectionHeader(states: setting(.unit(span), to: target), contended: contended, logPending: logPending, log: log)
    }

    /// The same header with the section-level contention mark set or cleared.
    package func with(contended value: Bool) -> SectionHeader {
        SectionHeader(states: states, contended: value, logPending: logPending, log: log)
    }
}
