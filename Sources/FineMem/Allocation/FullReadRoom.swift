extension FullRead {
    /// Whether these words hold room for a block of `2^chunkCountLog2` chunks: the answer
    /// "out of memory" rests on this being false for a read that shows one instant of the
    /// pool (`BlockAllocator.noRoomInCache`). Pending logs count as flushed (a commit has
    /// already changed the bitmap), and room in the middle of someone's operation counts
    /// as room (it is free, or about to be):
    /// - 1-16 chunks: an empty span entry in a section (a span to open), or a chunk-mode
    ///   entry over a span with a free aligned run, or over a span being opened or closed
    ///   (its chunks are free);
    /// - 1-16 spans: an aligned run of free entries in one section header, where an entry
    ///   is free when it is empty or in chunk mode over a span with no chunk in use (one
    ///   being closed, or opened: no block holds it);
    /// - whole sections: an aligned run of sections whose entries are all free (a section
    ///   held whole by a multi-section claim still in flight is held at that instant).
    func hasRoom(chunkCountLog2: Int) -> Bool {
        precondition(chunkCountLog2 >= 0, "a size of 2^\(chunkCountLog2) chunks")
        switch Block.layer(chunkCountLog2: chunkCountLog2) {
        case .chunk:
            for (index, word) in sections.enumerated() {
                guard let section = SectionHeader(rawValue: word)?.settled else { continue }
                for spanIndex in 0..<PoolGeometry.spansPerSection {
                    let state = section.state(ofSpan: spanIndex)
                    if state == .empty { return true }
                    guard state.isChunkMode, let span = spanHeader(section: index, span: spanIndex)?.settled else {
                        continue
                    }
                    if span.mode != .open || span.firstFreeRun(countLog2: chunkCountLog2) != nil { return true }
                }
            }
            return false
        case .section:
            let spanCountLog2 = chunkCountLog2 - SectionHeader.unitChunkCountLog2
            return sections.indices.contains { hasFreeRun(ofSpans: spanCountLog2, in: $0) }
        case .multiSection:
            let count = 1 << (chunkCountLog2 - Block.sectionLayerCountLog2Max)
            guard count <= sections.count else { return false }
            let wholeSection = PoolGeometry.spansPerSection.trailingZeroBitCount
            return stride(from: 0, through: sections.count - count, by: count).contains { first in
                (first..<first + count).allSatisfy { hasFreeRun(ofSpans: wholeSection, in: $0) }
            }
        }
    }

    /// Whether section `index` has an aligned run of `2^spanCountLog2` free entries (see
    /// `hasRoom`).
    private func hasFreeRun(ofSpans spanCountLog2: Int, in index: Int) -> Bool {
        guard let section = SectionHeader(rawValue: sections[index])?.settled else { return false }
        var free = 0
        for spanIndex in 0..<PoolGeometry.spansPerSection {
            let state = section.state(ofSpan: spanIndex)
            let isFree = state == .empty
                || state.isChunkMode && spanHeader(section: index, span: spanIndex)?.settled.bitmap == 0
            if isFree { free |= 1 << spanIndex }
        }
        let runLength = 1 << spanCountLog2
        let runMask = (1 << runLength) - 1
        return stride(from: 0, to: PoolGeometry.spansPerSection, by: runLength).contains { free >> $0 & runMask == runMask }
    }

    /// Whether `other` shows the same allocations as these words: every header word equal
    /// once the bits that never add or take room are left out (a pending bit a flush
    /// clears, the contention mark, the avoid hint of a chunk-mode entry). What stays
    /// (bitmaps, span modes, entry states, the temporary log with its sequence) changes
    /// with every block operation and span open or close, so two reads that show the
    /// same allocations show a state the pool was in at an instant between them (see
    /// `FullRead`). Flushes and hints go on all the time near a full pool; a comparison of
    /// the raw words would rarely find two reads equal.
    func showsSameAllocations(as other: FullRead) -> Bool {
        guard sections.count == other.sections.count, spans.count == other.spans.count else { return false }
        for index in sections.indices where Self.allocations(ofSection: sections[index]) != Self.allocations(ofSection: other.sections[index]) {
            return false
        }
        // Span words count under chunk-mode entries only, which both reads read.
        for section in sections.indices
        where SectionHeader.hasChunkModeEntry(sections[section]) && SectionHeader.hasChunkModeEntry(other.sections[section]) {
            let spans = section * PoolGeometry.spansPerSection..<(section + 1) * PoolGeometry.spansPerSection
            for index in spans where Self.allocations(ofSpan: self.spans[index]) != Self.allocations(ofSpan: other.spans[index]) { return false }
        }
        return true
    }

    /// The span header of `span` of `section`, which must be under a chunk-mode entry of
    /// this read (its spans were read); nil when the word does not decode.
    private func spanHeader(section: Int, span: Int) -> SpanHeader? {
        precondition(spansRead[section], "span \(span) of section \(section) was not read")
        return SpanHeader(rawValue: spans[section * PoolGeometry.spansPerSection + span])
    }

    /// A section word without its pending bit, contention mark and avoid hints.
    private static func allocations(ofSection word: UInt64) -> UInt64 {
        guard let header = SectionHeader(rawValue: word) else { return word }
        // An entry's states: 00 empty, 01 chunks, 10 chunks but avoid, 11 whole; avoid
        // becomes chunks.
        let states = header.states
        let avoid = states & ~(states << 1) & 0xAAAA_AAAA
        let normalized = states & ~avoid | avoid >> 1
        return SectionHeader(states: normalized, contended: false, logPending: false, log: header.log).rawValue
    }

    /// A span word without its pending bit and contention mark.
    private static func allocations(ofSpan word: UInt64) -> UInt64 {
        guard let header = SpanHeader(rawValue: word) else { return word }
        return SpanHeader(bitmap: header.bitmap, mode: header.mode, contended: false, logPending: false, log: header.log).rawValue
    }

    /// Whether the pool had no room for `2^chunkCountLog2` chunks throughout the time from
    /// `first` (an earlier full read) to these words, and so at every instant between the
    /// end of `first` and the start of this read. Every place the request could take must
    /// be held, in both reads, by a unit whose words did not change between them (a unit
    /// whose words changed may have been free in between):
    /// - a span whose section entry is whole, with the section's log the same in both (a
    ///   whole entry becomes free only by a block operation on the section, which changes
    ///   its log's sequence);
    /// - a chunk-mode span that is open with the same log and bitmap in both, with chunks
    ///   in use (for whole spans), or with no free aligned run of the size (for chunks).
    ///
    /// A place is a span (chunk requests), an aligned run of spans in a section, or an
    /// aligned run of sections: for the latter two one held unit holds the place. So a
    /// pool that churns elsewhere still shows a run of sections held throughout, where
    /// comparing every word (`showsSameAllocations`) would not. (The log sequence has 6
    /// bits: 64 block operations on one header between the two reads could bring it back.)
    func noRoomThroughout(since first: FullRead, chunkCountLog2: Int) -> Bool {
        guard sections.count == first.sections.count, spans.count == first.spans.count else { return false }
        let spansPerSection = PoolGeometry.spansPerSection
        switch Block.layer(chunkCountLog2: chunkCountLog2) {
        case .chunk:
            for section in sections.indices {
                for span in 0..<spansPerSection where !held(section, span, since: first, forChunks: chunkCountLog2) { return false }
            }
            return true
        case .section:
            let runLength = 1 << (chunkCountLog2 - SectionHeader.unitChunkCountLog2)
            for section in sections.indices {
                for start in stride(from: 0, to: spansPerSection, by: runLength)
                where !(start..<start + runLength).contains(where: { held(section, $0, since: first, forChunks: nil) }) {
                    return false
                }
            }
            return true
        case .multiSection:
            let count = 1 << (chunkCountLog2 - Block.sectionLayerCountLog2Max)
            guard count <= sections.count else { return true }
            for start in stride(from: 0, through: sections.count - count, by: count) {
                let isHeld = (start..<start + count).contains { section in
                    (0..<spansPerSection).contains { held(section, $0, since: first, forChunks: nil) }
                }
                if !isHeld { return false }
            }
            return true
        }
    }

    /// Whether span `span` of `section` was held throughout, from `first` to these words,
    /// as `noRoomThroughout` says: for whole spans (`forChunks` nil), or for a run of
    /// `2^forChunks` chunks.
    private func held(_ section: Int, _ span: Int, since first: FullRead, forChunks chunkCountLog2: Int?) -> Bool {
        guard let before = SectionHeader(rawValue: first.sections[section]), let after = SectionHeader(rawValue: sections[section]) else {
            return false
        }
        let (entryBefore, entryAfter) = (before.settled.state(ofSpan: span), after.settled.state(ofSpan: span))
        if entryBefore == .whole, entryAfter == .whole { return before.log == after.log }
        guard entryBefore.isChunkMode, entryAfter.isChunkMode else { return false }
        guard let spanBefore = first.spanHeader(section: section, span: span), let spanAfter = spanHeader(section: section, span: span),
              spanBefore.mode == .open, spanAfter.mode == .open, spanBefore.log == spanAfter.log, spanBefore.bitmap == spanAfter.bitmap else {
            return false
        }
        guard let chunkCountLog2 else { return spanAfter.bitmap != 0 }
        return spanAfter.firstFreeRun(countLog2: chunkCountLog2) == nil
    }
}
