/// An aligned run of `2^countLog2` units at `offset` inside one header's bitmap: chunks
/// of a span header, spans of a section header.
package struct HeaderRun: Hashable, Sendable, CustomStringConvertible {
    package let offset: Int
    package let countLog2: Int

    package init(offset: Int, countLog2: Int) {
        self.offset = offset
        self.countLog2 = countLog2
    }

    /// The run of one unit.
    package static func unit(_ offset: Int) -> HeaderRun { HeaderRun(offset: offset, countLog2: 0) }

    package var count: Int { 1 << countLog2 }
    package var units: Range<Int> { offset..<offset + count }
    package var description: String { "\(offset)+2^\(countLog2)" }
}

/// A header whose bitmap holds blocks as runs of its units (`SpanHeader`: chunks;
/// `SectionHeader`: spans). The allocation protocol claims and releases runs through this
/// one interface, whichever layer the header belongs to.
package protocol BlockHeader: LoggedHeader {
    /// One unit of the bitmap, as log2 of chunks (0: a chunk; 5: a span).
    static var unitChunkCountLog2: Int { get }
    /// Units the header covers.
    static var unitCount: Int { get }
    /// The largest run one block operation on this header takes, as log2 of units.
    static var countLog2Max: Int { get }
    /// Claims the free units of `run` for a block: the commit point of an allocation.
    func claiming(_ run: HeaderRun, owner: OwnerID) -> Self?
    /// Releases the allocated units of `run`: the commit point of a free.
    func releasing(_ run: HeaderRun, owner: OwnerID) -> Self?
    func marksAllocated(_ run: HeaderRun) -> Bool
    func marksFree(_ run: HeaderRun) -> Bool
    /// The lowest free, aligned run of `2^countLog2` units, if any.
    func firstFreeRun(countLog2: Int) -> HeaderRun?
}

extension BlockHeader {
    /// Whether `run` is aligned to its size and inside the header.
    package static func holds(_ run: HeaderRun) -> Bool {
        run.countLog2 >= 0 && run.countLog2 <= countLog2Max && run.offset >= 0 && run.offset < unitCount && run.offset % run.count == 0
    }

    /// The run `block` takes in the header that commits it.
    package static func run(of block: Block) -> HeaderRun {
        HeaderRun(offset: (block.firstChunk >> unitChunkCountLog2) % unitCount, countLog2: block.chunkCountLog2 - unitChunkCountLog2)
    }

    /// The block at `run` of the header at `slot` on `memoryNode`.
    package static func block(at run: HeaderRun, of slot: HeaderSlot, on memoryNode: NodeID) -> Block {
        Block(memoryNode: memoryNode, firstChunk: slot.firstChunk + run.offset << unitChunkCountLog2, chunkCountLog2: run.countLog2 + unitChunkCountLog2)
    }
}

/// The lowest aligned run of `2^countLog2` free units in a bitmap of `unitBits` bits per
/// unit, as its unit offset: `free` has the low bit of each free unit's field set and every
/// other bit clear. Branch-free: the run's units are folded onto its first bit (a run of
/// 2^(i+1) units is free where the runs of 2^i units at its start and its middle are), then
/// only the offsets aligned to the run's size are kept.
@inline(__always)
func lowestFreeAlignedRun(free: UInt32, unitBits: Int, countLog2: Int) -> Int? {
    var starts = free
    var width = UInt32(unitBits)
    for _ in 0..<countLog2 {
        starts &= starts >> width
        width <<= 1
    }
    // Bits at multiples of `width` (the run's size in bits): 1, 2, 4, ..., 32.
    let aligned: UInt32 = switch width {
    case 1: ~0
    case 2: 0x5555_5555
    case 4: 0x1111_1111
    case 8: 0x0101_0101
    case 16: 0x0001_0001
    default: 0x0000_0001
    }
    starts &= aligned
    return starts == 0 ? nil : starts.trailingZeroBitCount / unitBits
}

extension SpanHeader: BlockHeader {}
extension SectionHeader: BlockHeader {}

extension TemporaryLog {
    /// The run the log describes, in the units of its header (a multi-section log's size
    /// code is not a run).
    package var run: HeaderRun { HeaderRun(offset: Int(offset), countLog2: Int(sizeCode)) }
}
