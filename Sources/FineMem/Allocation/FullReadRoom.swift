extension FullRead {
    /// Whether these words hold room for a block of `2^chunkCountLog2` chunks: the answer
    /// "out of memory" rests on this being false for a read that shows one instant of the
    /// pool (`BlockAllocator.noRoomInCache`). Pending logs count as flushed (a commit has
    /// already changed the bitmap), and room in the middle of someone's operation counts
    /// as room (it is free, or about to be):
    /// - 1-16 chunks: an empty span entry in a section (a span to open), or a chunk-mode
    ///   entry over a span with a free aligned run, or over a span being opened or closed
    ///   (its chunks are free);
    /// - 1-16 spans: an aligned run of empty entries in one section header;
    /// - whole sections: an aligned run of wholly empty sections (a section held whole by
    ///   a multi-section claim still in flight is held at that instant).
    func hasRoom(chunkCountLog2: Int) -> Bool {
        precondition(chunkCountLog2 >= 0 && spans.count == sections.count * PoolGeometry.spansPerSection, "a full read of \(sections.count) sections")
        switch Block.layer(chunkCountLog2: chunkCountLog2) {
        case .chunk:
            for (index, word) in sections.enumerated() {
                guard let section = SectionHeader(rawValue: word)?.settled else { continue }
                for spanIndex in 0..<PoolGeometry.spansPerSection {
                    let state = section.state(ofSpan: spanIndex)
                    if state == .empty { return true }
                    guard state.isChunkMode, let span = SpanHeader(rawValue: spans[index * PoolGeometry.spansPerSection + spanIndex])?.settled else {
                        continue
                    }
                    if span.mode != .open || span.firstFreeRun(countLog2: chunkCountLog2) != nil { return true }
                }
            }
            return false
        case .section:
            let spanCountLog2 = chunkCountLog2 - SectionHeader.unitChunkCountLog2
            return sections.contains { SectionHeader(rawValue: $0)?.settled.firstFreeRun(countLog2: spanCountLog2) != nil }
        case .multiSection:
            let count = 1 << (chunkCountLog2 - Block.sectionLayerCountLog2Max)
            guard count <= sections.count else { return false }
            return stride(from: 0, through: sections.count - count, by: count).contains { first in
                sections[first..<first + count].allSatisfy { SectionHeader(rawValue: $0)?.settled.isAllEmpty == true }
            }
        }
    }
}
