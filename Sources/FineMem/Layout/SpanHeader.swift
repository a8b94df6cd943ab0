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
/// - `mode`: `closed` (the span is not in chunk mode; its bitmap is empty), `opening`
///   (the node in `log.owner` is putting it into chunk mode: it marked the span, and flips
///   the section entry in the same doorbell), `open` (chunk allocations happen here),
///   `closing` (being returned to its section by the node in `log.owner`). Outside `open`
///   the bitmap is empty, and the log is not pending except right after the free that
///   emptied an open span.
/// - `logPending`: the temporary log has not reached the full log yet. Every block
///   operation (claim, release, open) requires it clear and sets it; only the node that
///   committed the log clears it (after writing the full-log record, in the same doorbell),
///   or recovery after that node is fenced. So a pending log can never be overwritten, and
///   a flush can never land after a newer one: a stale flush is impossible, not unlikely.
/// - `contended`: contention control marked this span; searches avoid it.
package struct SpanHeader: RawRepresentable, Hashable, Sendable {
    package enum Mode: UInt64, Sendable, CaseIterable { case closed = 0, open = 1, closing = 2, opening = 3 }

    package static let chunkCount = 32
    package static let unitChunkCountLog2 = 0
    package static let unitCount = 32
    package static let countLog2Max = 4
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
    package var isValid: Bool { (mode == .open || bitmap == 0) && Self.holds(log.run) }

    /// The mask of a run of chunks.
    package static func runMask(_ run: HeaderRun) -> UInt32 {
        run.count == 32 ? ~0 : ((1 << UInt32(run.count)) - 1) << UInt32(run.offset)
    }

    /// The lowest free, aligned run of `2^countLog2` chunks, if any.
    package func firstFreeRun(countLog2: Int) -> HeaderRun? {
        guard mode == .open, countLog2 >= 0, countLog2 <= Self.countLog2Max else { return nil }
        return lowestFreeAlignedRun(free: ~bitmap, unitBits: 1, countLog2: countLog2).map { HeaderRun(offset: $0, countLog2: countLog2) }
    }

    /// Whether every chunk of `run` is marked in use.
    package func marksAllocated(_ run: HeaderRun) -> Bool { bitmap & Self.runMask(run) == Self.runMask(run) }

    /// Whether no chunk of `run` is marked in use.
    package func marksFree(_ run: HeaderRun) -> Bool { bitmap & Self.runMask(run) == 0 }

    /// Whether the pending (or last) log describes an allocation: its run is all set.
    package var logDescribesAllocation: Bool { marksAllocated(log.run) }

    // MARK: Transitions (pure; nil when not allowed)

    private func committing(bitmap newBitmap: UInt32, mode newMode: Mode, _ run: HeaderRun, owner: OwnerID) -> SpanHeader {
        SpanHeader(
            bitmap: newBitmap, mode: newMode, contended: contended, logPending: true,
            log: TemporaryLog(offset: UInt8(run.offset), sizeCode: UInt8(run.countLog2), owner: owner, sequence: log.sequence.next))
    }

    /// Claims the chunks of `run` in an open span: the commit point of a chunk-layer
    /// allocation.
    package func claiming(_ run: HeaderRun, owner: OwnerID) -> SpanHeader? {
        guard mode == .open, !logPending, Self.holds(run), marksFree(run) else { return nil }
        return committing(bitmap: bitmap | Self.runMask(run), mode: .open, run, owner: owner)
    }

    /// Marks a closed span as being opened by `owner`: the first step of opening it, sent
    /// in one doorbell with the flip of its section entry to chunk mode, so that between
    /// any two verbs of an opening the span names the node that holds it.
    package func markingOpening(owner: OwnerID) -> SpanHeader? {
        guard canBeOpened else { return nil }
        return SpanHeader(bitmap: 0, mode: .opening, contended: false, logPending: false, log: log.naming(owner))
    }

    /// Whether the span is closed with nothing pending: free to be opened.
    package var canBeOpened: Bool { mode == .closed && !logPending && bitmap == 0 }

    /// Gives up an opening `owner` marked (its section entry could not be flipped).
    package func abandoningOpening(owner: OwnerID) -> SpanHeader? {
        guard mode == .opening, log.owner == owner else { return nil }
        return SpanHeader(bitmap: 0, mode: .closed, contended: false, logPending: false, log: log)
    }

    /// Opens a span that `owner` marked `opening` (and whose section entry it flipped to
    /// chunk mode) and claims `run` in the same CAS.
    package func opening(_ run: HeaderRun, owner: OwnerID) -> SpanHeader? {
        guard mode == .opening, log.owner == owner, !logPending, bitmap == 0, Self.holds(run) else { return nil }
        return committing(bitmap: Self.runMask(run), mode: .open, run, owner: owner)
    }

    /// Releases the allocated chunks of `run`: the commit point of a free.
    package func releasing(_ run: HeaderRun, owner: OwnerID) -> SpanHeader? {
        guard mode == .open, !logPending, Self.holds(run), marksAllocated(run) else { return nil }
        return committing(bitmap: bitmap & ~Self.runMask(run), mode: .open, run, owner: owner)
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
