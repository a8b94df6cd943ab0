/// Errors in describing or reading a pool's layout.
public enum LayoutError: Error, Sendable, Hashable, CustomStringConvertible {
    case sectionCountOutOfRange(Int)
    case computeNodeSlotsOutOfRange(Int)
    case intentSlotsOutOfRange(Int)
    case badMagic(UInt64)
    case unsupportedVersion(UInt64)
    case superblockMismatch(String)
    /// The pool ends beyond the 48 bits of address a `RemotePointer` holds.
    case addressBeyondPointerRange(RemoteAddress)

    public var description: String {
        switch self {
        case .sectionCountOutOfRange(let count): "section count \(count) is outside 1...\(PoolGeometry.maxSections)"
        case .computeNodeSlotsOutOfRange(let count): "compute node slots \(count) is outside 1...\(OwnerID.maxRawValue)"
        case .intentSlotsOutOfRange(let count): "intent slots per node \(count) is outside 1...64"
        case .badMagic(let magic): "not a FineMem pool (magic 0x\(String(magic, radix: 16)))"
        case .unsupportedVersion(let version): "unsupported layout version \(version)"
        case .superblockMismatch(let what): "superblock disagrees with the expected geometry: \(what)"
        case .addressBeyondPointerRange(let end): "the pool ends at \(end), beyond the 48 bits of a remote pointer"
        }
    }
}

/// The geometry of one memory node's pool: where every metadata array and the data area
/// live, as byte offsets from the pool's base. Pure arithmetic; no I/O.
///
/// ```
/// offset 0                                                       metadataBytes (2 MiB aligned)
/// | superblock | node table | intent table | section headers | span headers | room summary | full log | capabilities | pad | data ...
///   64 B         8 B/slot     8 B/slot/intent  8 B/section     8 B/span       1 bit/section  8 B/chunk   8 B/chunk           2 MiB/section
/// ```
///
/// The room summary has two levels (`RoomSummary`): a bit per section, then a bit per
/// word of those.
package struct PoolGeometry: Sendable, Hashable {
    package static let chunkBytes: UInt64 = 4096
    package static let chunksPerSpan = 32
    package static let spansPerSection = 16
    package static let chunksPerSection = 512
    package static let spanBytes: UInt64 = 128 << 10
    package static let sectionBytes: UInt64 = 2 << 20
    package static let superblockBytes: UInt64 = 64
    /// Sections addressable by an intent record (26 bits): 128 TiB of data.
    package static let maxSections = 1 << 26

    package let sectionCount: Int
    package let computeNodeSlots: Int
    package let intentSlotsPerNode: Int

    package let nodeTableOffset: UInt64
    package let intentTableOffset: UInt64
    package let sectionHeadersOffset: UInt64
    package let spanHeadersOffset: UInt64
    /// The room summary's words of section bits, then its top words (a bit per word).
    package let roomSummaryOffset: UInt64
    package let roomSummaryTopOffset: UInt64
    package let fullLogOffset: UInt64
    package let capabilitiesOffset: UInt64
    /// Bytes of metadata, rounded up to a whole section so the data area is 2 MiB aligned.
    package let metadataBytes: UInt64

    package init(sectionCount: Int, computeNodeSlots: Int = 64, intentSlotsPerNode: Int = 8) throws(LayoutError) {
        guard sectionCount >= 1, sectionCount <= Self.maxSections else { throw .sectionCountOutOfRange(sectionCount) }
        guard computeNodeSlots >= 1, computeNodeSlots <= Int(OwnerID.maxRawValue) else {
            throw .computeNodeSlotsOutOfRange(computeNodeSlots)
        }
        guard intentSlotsPerNode >= 1, intentSlotsPerNode <= 64 else { throw .intentSlotsOutOfRange(intentSlotsPerNode) }
        self.sectionCount = sectionCount
        self.computeNodeSlots = computeNodeSlots
        self.intentSlotsPerNode = intentSlotsPerNode
        func aligned(_ x: UInt64) -> UInt64 { (x + 63) / 64 * 64 }
        nodeTableOffset = Self.superblockBytes
        intentTableOffset = aligned(nodeTableOffset + 8 * UInt64(computeNodeSlots))
        sectionHeadersOffset = aligned(intentTableOffset + 8 * UInt64(computeNodeSlots * intentSlotsPerNode))
        spanHeadersOffset = aligned(sectionHeadersOffset + 8 * UInt64(sectionCount))
        let chunks = UInt64(sectionCount) * UInt64(Self.chunksPerSection)
        roomSummaryOffset = aligned(spanHeadersOffset + 8 * UInt64(sectionCount * Self.spansPerSection))
        roomSummaryTopOffset = aligned(roomSummaryOffset + 8 * UInt64(RoomSummary.wordCount(sections: sectionCount)))
        fullLogOffset = aligned(roomSummaryTopOffset + 8 * UInt64(RoomSummary.topWordCount(sections: sectionCount)))
        capabilitiesOffset = fullLogOffset + 8 * chunks
        let end = capabilitiesOffset + 8 * chunks
        metadataBytes = (end + Self.sectionBytes - 1) / Self.sectionBytes * Self.sectionBytes
    }

    /// The geometry whose data area holds at least `dataBytes`.
    package init(dataBytes: UInt64, computeNodeSlots: Int = 64, intentSlotsPerNode: Int = 8) throws(LayoutError) {
        let sections = (dataBytes + Self.sectionBytes - 1) / Self.sectionBytes
        guard sections <= UInt64(Self.maxSections) else { throw .sectionCountOutOfRange(Int(clamping: sections)) }
        try self.init(sectionCount: Int(sections), computeNodeSlots: computeNodeSlots, intentSlotsPerNode: intentSlotsPerNode)
    }

    package var chunkCount: Int { sectionCount * Self.chunksPerSection }
    package var spanCount: Int { sectionCount * Self.spansPerSection }
    package var dataOffset: UInt64 { metadataBytes }
    package var dataBytes: UInt64 { UInt64(sectionCount) * Self.sectionBytes }
    package var totalBytes: UInt64 { metadataBytes + dataBytes }

    /// Bytes of metadata that scale with the pool (headers, full log, capabilities) per
    /// byte of data, in percent: the figure the paper puts at about 0.39 %.
    package var metadataOverheadPercent: Double {
        let perPool = Double(capabilitiesOffset + 8 * UInt64(chunkCount) - sectionHeadersOffset)
        return 100 * perPool / Double(dataBytes)
    }

    /// Bytes of the metadata area (rounded) per byte of data, in percent.
    package var metadataAreaPercent: Double { 100 * Double(metadataBytes) / Double(dataBytes) }

    package func nodeSlotOffset(_ owner: OwnerID) -> UInt64 { nodeTableOffset + 8 * UInt64(owner.rawValue) }
    package func intentOffset(owner: OwnerID, slot: Int) -> UInt64 {
        intentTableOffset + 8 * UInt64(Int(owner.rawValue) * intentSlotsPerNode + slot)
    }
    package func sectionHeaderOffset(_ section: Int) -> UInt64 { sectionHeadersOffset + 8 * UInt64(section) }
    package func spanHeaderOffset(section: Int, span: Int) -> UInt64 {
        spanHeadersOffset + 8 * UInt64(section * Self.spansPerSection + span)
    }
    package func roomSummaryOffset(word: Int) -> UInt64 { roomSummaryOffset + 8 * UInt64(word) }
    package func roomSummaryTopOffset(word: Int) -> UInt64 { roomSummaryTopOffset + 8 * UInt64(word) }
    package func fullLogOffset(chunk: Int) -> UInt64 { fullLogOffset + 8 * UInt64(chunk) }
    package func capabilityOffset(chunk: Int) -> UInt64 { capabilitiesOffset + 8 * UInt64(chunk) }
    package func dataOffset(chunk: Int) -> UInt64 { dataOffset + UInt64(chunk) * Self.chunkBytes }

    /// The chunk at data offset `offset`, if the offset is inside the data area.
    package func chunk(atDataOffset offset: UInt64) -> Int? {
        guard offset >= dataOffset, offset < totalBytes else { return nil }
        return Int((offset - dataOffset) / Self.chunkBytes)
    }
}

/// The superblock: the first 64 bytes of a pool.
///
/// ```
/// word 0: magic "FINEMEM\0"   word 1: layout version   word 2: section count
/// word 3: compute node slots   word 4: intent slots per node   word 5: format epoch
/// words 6-7: zero
/// ```
package struct Superblock: Hashable, Sendable {
    package static let magic: UInt64 = 0x004D_454D_454E_4946  // "FINEMEM\0" little-endian
    package static let version: UInt64 = 2

    package var geometry: PoolGeometry
    package var epoch: UInt64

    package init(geometry: PoolGeometry, epoch: UInt64) {
        self.geometry = geometry
        self.epoch = epoch
    }

    package var words: [UInt64] {
        [Self.magic, Self.version, UInt64(geometry.sectionCount), UInt64(geometry.computeNodeSlots),
         UInt64(geometry.intentSlotsPerNode), epoch, 0, 0]
    }

    package init(words: [UInt64]) throws(LayoutError) {
        guard words.count == 8, words[0] == Self.magic else { throw .badMagic(words.first ?? 0) }
        guard words[1] == Self.version else { throw .unsupportedVersion(words[1]) }
        guard words[6] == 0, words[7] == 0, words[2] <= UInt64(PoolGeometry.maxSections),
              words[3] <= UInt64(OwnerID.maxRawValue), words[4] <= 64
        else { throw .superblockMismatch("reserved words or fields out of range") }
        geometry = try PoolGeometry(
            sectionCount: Int(words[2]), computeNodeSlots: Int(words[3]), intentSlotsPerNode: Int(words[4]))
        epoch = words[5]
    }
}
