/// The room summary of a pool: which sections may have room for a chunk, so that a
/// compute node whose cache shows none finds where to look by reading a few words instead
/// of every header.
///
/// Two levels of bits in the metadata area (`PoolGeometry.roomSummaryOffset`):
/// - a **word** holds a bit per section, 64 sections a word: set when the section header
///   shows no room (`SectionHeader.hasRoom` is false);
/// - a **top word** holds a bit per word: set when every section of that word is full.
///
/// Zeroed memory, a pool as formatted, says: room everywhere. The summary is a hint kept
/// by the compute nodes that change section headers (`MemoryNodeLink.syncRoomSummary`,
/// after the CAS that changed a section's room): a bit may be stale for a while, or for
/// good when its node dies between the CAS and the sync. It is never trusted for "no
/// room": a search that finds nothing through the summary reads every header before it
/// answers that the pool is full, and mends the bits that read shows stale.
package enum RoomSummary {
    /// Children (sections, or words) per word.
    package static let fanOut = 64

    package static func wordCount(sections: Int) -> Int { (sections + fanOut - 1) / fanOut }
    package static func topWordCount(sections: Int) -> Int { (wordCount(sections: sections) + fanOut - 1) / fanOut }

    /// The word of a level holding child `child`'s bit, and the bit.
    package static func word(of child: Int) -> Int { child / fanOut }
    package static func bit(of child: Int) -> UInt64 { 1 << UInt64(child % fanOut) }

    /// The bits of word `word` that stand for one of `children` children (the last word
    /// of a level may be partial).
    package static func validBits(word: Int, children: Int) -> UInt64 {
        let count = children - word * fanOut
        return count >= fanOut ? ~0 : (1 << UInt64(max(0, count))) - 1
    }

    /// Whether a word of section bits says every one of its sections is full.
    package static func allFull(_ value: UInt64, word: Int, sections: Int) -> Bool {
        let valid = validBits(word: word, children: sections)
        return value & valid == valid
    }

    /// `parent` with the bits of the children in `children` (whose words are
    /// `childWords`, from `children.lowerBound` on) set to what `isFull` says of each.
    package static func updating(
        _ parent: UInt64, word: Int, children: Range<Int>, childWords: [UInt64], isFull: (Int, UInt64) -> Bool
    ) -> UInt64 {
        var value = parent
        let first = max(children.lowerBound, word * fanOut)
        let end = min(children.upperBound, (word + 1) * fanOut)
        for child in first..<max(first, end) {
            if isFull(child, childWords[child - children.lowerBound]) { value |= bit(of: child) } else { value &= ~bit(of: child) }
        }
        return value
    }

    /// The sections whose summary bits disagree with their headers, as one range from the
    /// first to the last (with every section of a word whose top bit disagrees with the
    /// word), or nil when the summary agrees everywhere. `sections` are the section header
    /// words, `words` and `topWords` the summary's, all as read together.
    package static func staleSections(sections: [UInt64], words: [UInt64], topWords: [UInt64]) -> Range<Int>? {
        var first = Int.max
        var last = -1
        for word in words.indices {
            let children = word * fanOut..<min(sections.count, (word + 1) * fanOut)
            let expected = updating(words[word], word: word, children: children, childWords: Array(sections[children])) { _, header in
                !(SectionHeader(rawValue: header)?.hasRoom ?? true)
            }
            let topStale = (topWords[self.word(of: word)] & bit(of: word) != 0) != allFull(words[word], word: word, sections: sections.count)
            let stale = expected ^ words[word]
            if topStale {
                first = min(first, children.lowerBound)
                last = max(last, children.upperBound - 1)
            } else if stale != 0 {
                first = min(first, word * fanOut + stale.trailingZeroBitCount)
                last = max(last, word * fanOut + (fanOut - 1 - stale.leadingZeroBitCount))
            }
        }
        return last < 0 ? nil : first..<last + 1
    }
}

extension SectionHeader {
    /// Whether a chunk may be found here: a span empty, or in chunk mode without the avoid
    /// hint (a span state whose high bit is clear). What a section's room summary bit says.
    package var hasRoom: Bool { states & 0xAAAA_AAAA != 0xAAAA_AAAA }
}
