/// The header of one span (32 chunks, 128 KiB): its chunk bitmap and temporary log.
///
/// ```
///  63      58 57          44 43  41 40   36  35   34   33 32 31                    0
/// +----------+--------------+------+-------+----+----+-----+------------------------+
/// | log seq  |  log owner   | log  |  log  |pend|cont| mode|   chunk bitmap (32)    |
/// |  (6)     |    (14)      | size | offset| ing|ended| (2) |  bit i = chunk i used  |
/// |          |              |code 3| (5)  |(1) |(1) |     |                        |
/// +----------+--------------+------+-------+----+----+-----+------------------------+
/// ```
///
/// - `mode`: `closed` (the span is not in chunk mode; its bitmap is empty), `open` (chunk
///   allocations happen here), `closing` (being returned to its section by the node in
///   `log.owner`). 3 is invalid.
/// - `logPending`: the temporary log has not reached the full log yet. Every block
///   operation (claim, release, open) requires it clear and sets it; only the node that
///   committed the log clears it (after writing the full-log record, in the same doorbell),
///   or recovery after that node is fenced. So a pending log can never be overwritten, and
///   a flush can never land after a newer one: a stale flush is impossible, not unlikely.
/// - `contended`: contention control marked this span; searches avoid it.
package struct SpanHeader: RawRepresentable, Hashable, Sendable {
    package enum Mode: UInt64, Sendable, CaseIterable { case closed = 0, open = 1, closing = 2 }

    package static let chunkCount = 32
    static let bitmapField = BitField(0, 32)
    static let modeField = BitField(32, 2)
    static let contendedField = BitField(34, 1)
    static let pendingField = BitField(35, 1)
    static let sizeField = BitField(41, 3)
    static let logFields = LogFieldLayout(offset: BitField(36, 5), sizeCode: sizeField, owner: BitField(44, 14), sequence: BitField(58, 6))

    package private(set) var rawValue: UInt64

    /// Decodes a word; nil if it is not a valid span header.
    package init?(rawValue: UInt64) {
        guard Mode(rawValue: Self.modeField.get(rawValue)) != nil, Self.sizeField.get(rawValue) <= 4 else { return nil }
        self.rawValue = rawValue
        guard isValid else { return nil }
    }

    /// An empty, closed span.
    package static let empty = SpanHeader(bitmap: 0, mode: .closed, contended: false, logPending: false, log: .empty)

    package init(bitmap: UInt32, mode: Mode, contended: Bool, logPending: Bool, log: TemporaryLog) {
        precondition(log.offset < 32 && log.sizeCode <= 4, "log \(log) does not fit a span")
        var word: UInt64 = 0
        Self.bitmapField.set(&word, UInt64(bitmap))
        Self.modeField.set(&word, mode.rawValue)
        Self.contendedField.set(&word, contended ? 1 : 0)
        Self.pendingField.set(&word, logPending ? 1 : 0)
        Self.logFields.encode(log, into: &word)
        rawValue = word
    }

    package var bitmap: UInt32 { UInt32(Self.bitmapField.get(rawValue)) }
    package var mode: Mode { Mode(rawValue: Self.modeField.get(rawValue))! }
    package var contended: Bool { Self.contendedField.get(rawValue) == 1 }
    package var logPending: Bool { Self.pendingField.get(rawValue) == 1 }
    package var log: TemporaryLog { Self.logFields.decode(rawValue) }

    /// Structural rules: a span that is not open has an empty bitmap; the log's block is
    /// aligned to its size and inside the span.
    package var isValid: Bool {
        let log = log
        let sizeOK = Int(log.offset) % (1 << log.sizeCode) == 0
        return (mode == .open || bitmap == 0) && sizeOK
    }

    /// The mask of `2^chunkCountLog2` chunks at `offset`.
    package static func runMask(offset: Int, chunkCountLog2: Int) -> UInt32 {
        let count = 1 << chunkCountLog2
        return count == 32 ? ~0 : ((1 << UInt32(count)) - 1) << UInt32(offset)
    }

    /// The lowest offset of a free, aligned run of `2^chunkCountLog2` chunks, if any.
    package func firstFreeRun(chunkCountLog2: Int) -> Int? {
        guard mode == .open, chunkCountLog2 >= 0, chunkCountLog2 <= 4 else { return nil }
        let step = 1 << chunkCountLog2
        for offset in stride(from: 0, to: 32, by: step) where bitmap & Self.runMask(offset: offset, chunkCountLog2: chunkCountLog2) == 0 {
            return offset
        }
        return nil
    }

    /// Whether every chunk of the run at `offset` is marked in use.
    package func marksAllocated(offset: Int, chunkCountLog2: Int) -> Bool {
        let mask = Self.runMask(offset: offset, chunkCountLog2: chunkCountLog2)
        return bitmap & mask == mask
    }

    /// Whether no chunk of the run at `offset` is marked in use.
    package func marksFree(offset: Int, chunkCountLog2: Int) -> Bool {
        bitmap & Self.runMask(offset: offset, chunkCountLog2: chunkCountLog2) == 0
    }

    /// Whether the pending (or last) log describes an allocation: its run is all set.
    package var logDescribesAllocation: Bool {
        let mask = Self.runMask(offset: Int(log.offset), chunkCountLog2: Int(log.sizeCode))
        return bitmap & mask == mask
    }

    // MARK: Transitions (pure; nil when not allowed)

    private func committing(bitmap newBitmap: UInt32, mode newMode: Mode, offset: Int, chunkCountLog2: Int, owner: OwnerID) -> SpanHeader {
        SpanHeader(
            bitmap: newBitmap, mode: newMode, contended: contended, logPending: true,
            log: TemporaryLog(offset: UInt8(offset), sizeCode: UInt8(chunkCountLog2), owner: owner, sequence: log.sequence.next))
    }

    private func fits(offset: Int, chunkCountLog2: Int) -> Bool {
        chunkCountLog2 >= 0 && chunkCountLog2 <= 4 && offset >= 0 && offset < 32 && offset % (1 << chunkCountLog2) == 0
    }

    /// Claims `2^chunkCountLog2` chunks at `offset` in an open span: the commit point of a
    /// chunk-layer allocation.
    package func claiming(offset: Int, chunkCountLog2: Int, owner: OwnerID) -> SpanHeader? {
        guard mode == .open, !logPending, fits(offset: offset, chunkCountLog2: chunkCountLog2) else { return nil }
        let mask = Self.runMask(offset: offset, chunkCountLog2: chunkCountLog2)
        guard bitmap & mask == 0 else { return nil }
        return committing(bitmap: bitmap | mask, mode: .open, offset: offset, chunkCountLog2: chunkCountLog2, owner: owner)
    }

    /// Opens a closed span (its section entry was just flipped to chunk mode by `owner`)
    /// and claims a run in the same CAS.
    package func opening(offset: Int, chunkCountLog2: Int, owner: OwnerID) -> SpanHeader? {
        guard mode == .closed, !logPending, bitmap == 0, fits(offset: offset, chunkCountLog2: chunkCountLog2) else { return nil }
        let mask = Self.runMask(offset: offset, chunkCountLog2: chunkCountLog2)
        return committing(bitmap: mask, mode: .open, offset: offset, chunkCountLog2: chunkCountLog2, owner: owner)
    }

    /// Releases `2^chunkCountLog2` allocated chunks at `offset`: the commit point of a free.
    package func releasing(offset: Int, chunkCountLog2: Int, owner: OwnerID) -> SpanHeader? {
        guard mode == .open, !logPending, fits(offset: offset, chunkCountLog2: chunkCountLog2) else { return nil }
        let mask = Self.runMask(offset: offset, chunkCountLog2: chunkCountLog2)
        guard bitmap & mask == mask else { return nil }
        return committing(bitmap: bitmap & ~mask, mode: .open, offset: offset, chunkCountLog2: chunkCountLog2, owner: owner)
    }

    /// Marks the pending log as written to the full log.
    package func flushed() -> SpanHeader? {
        guard logPending else { return nil }
        return SpanHeader(bitmap: bitmap, mode: mode, contended: contended, logPending: false, log: log)
    }

    /// Starts returning an empty open span to its section; `log.owner` (the node whose
    /// free emptied it) finishes the return.
    package func closing() -> SpanHeader? {
        guard mode == .open, !logPending, bitmap == 0 else { return nil }
        return SpanHeader(bitmap: 0, mode: .closing, contended: false, logPending: false, log: log)
    }

    /// Finishes returning a span (after its section entry went back to empty).
    package func closed() -> SpanHeader? {
        guard mode == .closing else { return nil }
        return SpanHeader(bitmap: 0, mode: .closed, contended: false, logPending: logPending, log: log)
    }

    /// The same header with the contention mark set or cleared.
    package func with(contended value: Bool) -> SpanHeader {
        SpanHeader(bitmap: bitmap, mode: mode, contended: value, logPending: logPending, log: log)
    }
}
