import Testing
@testable import FineMem
import FineMemHarness

/// The pure rules of the out-of-memory answer on full reads (`FullRead.hasRoom`,
/// `showsSameAllocations`, `noRoomThroughout`), on hand-made words of a one-section pool.
@Suite struct FullReadRoomTests {
    private static func log(_ sequence: UInt8, owner: UInt16 = 3) -> TemporaryLog {
        TemporaryLog(offset: 0, sizeCode: 0, owner: OwnerID(owner), sequence: LogSequence(rawValue: sequence))
    }

    /// One section: its entries `states` under a section log of `sectionSequence`, and
    /// span words `span(index)`.
    private static func read(
        _ states: [SectionHeader.SpanState], sectionSequence: UInt8 = 1, pending: Bool = false, span: (Int) -> SpanHeader = { _ in .empty }
    ) -> FullRead {
        let section = SectionHeader(spanStates: states, contended: false, logPending: pending, log: log(sectionSequence))
        return FullRead(sections: [section.rawValue], spans: (0..<PoolGeometry.spansPerSection).map { span($0).rawValue })
    }

    private static func fullSpan(_ sequence: UInt8, bitmap: UInt32 = ~0) -> SpanHeader {
        SpanHeader(bitmap: bitmap, mode: .open, contended: false, logPending: false, log: log(sequence))
    }

    /// A full read reads span words in ranges of sections: near ones as one, and a range
    /// from the first to the last once there are too many.
    @Test func spanWordsAreReadInFewRanges() {
        func needed(_ sections: [Int], count: Int) -> [Bool] { (0..<count).map(sections.contains) }
        #expect(FullRead.spanRanges(of: needed([], count: 40)) == [])
        #expect(FullRead.spanRanges(of: needed([3], count: 40)) == [3..<4])
        // Less than `spanRangeGapMax` sections apart: one range.
        #expect(FullRead.spanRanges(of: needed([3, 4, 10], count: 40)) == [3..<11])
        #expect(FullRead.spanRanges(of: needed([3, 19, 20], count: 40)) == [3..<4, 19..<21])
        let scattered = stride(from: 0, to: 20 * (FullRead.spanRangesMax + 1), by: 20).map { $0 }
        #expect(FullRead.spanRanges(of: needed(scattered, count: scattered.last! + 1)) == [0..<scattered.last! + 1])
        // A span word not read decodes as no header, so no rule can mistake it for one.
        #expect(SpanHeader(rawValue: FullRead.unreadSpan) == nil)
    }

    @Test func aWholeSectionIsHeldThroughoutOnlyUnderTheSameLog() {
        let whole = Array(repeating: SectionHeader.SpanState.whole, count: 16)
        let first = Self.read(whole, sectionSequence: 1)
        // The same log (pending bit aside): no block operation on the section in between.
        #expect(Self.read(whole, sectionSequence: 1, pending: true).noRoomThroughout(since: first, chunkCountLog2: 9))
        #expect(!first.hasRoom(chunkCountLog2: 9) && !first.hasRoom(chunkCountLog2: 0))
        // Another sequence: the section may have been freed and taken again in between.
        let later = Self.read(whole, sectionSequence: 2)
        #expect(!later.noRoomThroughout(since: first, chunkCountLog2: 9))
        #expect(!later.noRoomThroughout(since: first, chunkCountLog2: 0))
    }

    @Test func aFullSpanIsHeldThroughoutOnlyWithTheSameLogAndBitmap() {
        let chunks = Array(repeating: SectionHeader.SpanState.chunks, count: 16)
        let first = Self.read(chunks) { Self.fullSpan(UInt8($0)) }
        #expect(Self.read(chunks) { Self.fullSpan(UInt8($0)) }.noRoomThroughout(since: first, chunkCountLog2: 0))
        // Span 5 saw a block operation in between (a chunk freed and taken again): it may
        // have had room then.
        let churned = Self.read(chunks) { Self.fullSpan(UInt8($0) &+ ($0 == 5 ? 1 : 0)) }
        #expect(!churned.noRoomThroughout(since: first, chunkCountLog2: 0))
        #expect(!churned.showsSameAllocations(as: first))
        // For whole spans, one held unit of an aligned run holds the run: span 5's churn
        // does not hide that spans 4-7 were held throughout by span 4.
        #expect(churned.noRoomThroughout(since: first, chunkCountLog2: 5 + 2))
        // A span with room is room.
        let roomy = Self.read(chunks) { Self.fullSpan(UInt8($0), bitmap: $0 == 9 ? ~1 : ~0) }
        #expect(roomy.hasRoom(chunkCountLog2: 0) && !roomy.noRoomThroughout(since: roomy, chunkCountLog2: 0))
    }

    @Test func aChunkModeEntryOverAnEmptySpanIsRoomForWholeSpans() {
        var states = Array(repeating: SectionHeader.SpanState.whole, count: 16)
        states[3] = .chunks
        let closing = Self.read(states) { $0 == 3 ? SpanHeader(bitmap: 0, mode: .closing, contended: false, logPending: false, log: Self.log(4)) : .empty }
        #expect(closing.hasRoom(chunkCountLog2: 5))
        #expect(!closing.hasRoom(chunkCountLog2: 9))
        #expect(!closing.noRoomThroughout(since: closing, chunkCountLog2: 5))
    }

    @Test func hintsContentionAndPendingBitsAreNotAllocations() {
        var avoid = Array(repeating: SectionHeader.SpanState.chunks, count: 16)
        avoid[2] = .chunksAvoid
        let first = Self.read(Array(repeating: .chunks, count: 16)) { Self.fullSpan(UInt8($0)) }
        let hinted = Self.read(avoid, pending: true) { span in
            var header = Self.fullSpan(UInt8(span))
            if span == 7 { header = header.with(contended: true) }
            return header
        }
        #expect(hinted.showsSameAllocations(as: first))
        #expect(hinted.noRoomThroughout(since: first, chunkCountLog2: 0))
    }
}
