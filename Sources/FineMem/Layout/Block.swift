/// One block: `2^chunkCountLog2` chunks starting at `firstChunk` of a memory node,
/// aligned to its size. Which header commits its operations follows from its size (its
/// `layer`), and where in that header from its first chunk.
package struct Block: Hashable, Sendable, CustomStringConvertible {
    package let memoryNode: NodeID
    package let firstChunk: Int
    package let chunkCountLog2: Int

    package init(memoryNode: NodeID, firstChunk: Int, chunkCountLog2: Int) {
        self.memoryNode = memoryNode
        self.firstChunk = firstChunk
        self.chunkCountLog2 = chunkCountLog2
    }

    /// Blocks of up to this many chunks (log2) live inside one span.
    package static let chunkLayerCountLog2Max = 4
    /// Blocks of up to this many chunks (log2) live inside one section.
    package static let sectionLayerCountLog2Max = 9

    package var chunkCount: Int { 1 << chunkCountLog2 }
    package var chunks: Range<Int> { firstChunk..<firstChunk + chunkCount }
    package var bytes: UInt64 { UInt64(chunkCount) * PoolGeometry.chunkBytes }

    /// Which header commits this block's operations.
    package var layer: FullLogRecord.Layer { Self.layer(chunkCountLog2: chunkCountLog2) }

    /// Which header commits the operations of a block of `2^chunkCountLog2` chunks.
    package static func layer(chunkCountLog2: Int) -> FullLogRecord.Layer {
        switch chunkCountLog2 {
        case ...chunkLayerCountLog2Max: .chunk
        case ...sectionLayerCountLog2Max: .section
        default: .multiSection
        }
    }

    /// The section of the block's first chunk.
    package var section: Int { firstChunk / PoolGeometry.chunksPerSection }
    /// The span of the block's first chunk, inside its section.
    package var spanInSection: Int { firstChunk % PoolGeometry.chunksPerSection / PoolGeometry.chunksPerSpan }
    /// Sections of a multi-section block, log2.
    package var sectionCountLog2: Int { chunkCountLog2 - 9 }
    /// The sections a multi-section block covers.
    package var sections: Range<Int> { section..<section + (1 << max(0, sectionCountLog2)) }

    /// Whether the block is aligned to its size and inside a pool of `geometry`.
    package func fits(_ geometry: PoolGeometry) -> Bool {
        firstChunk >= 0 && chunkCountLog2 >= 0 && chunkCountLog2 < Int.bitWidth - 1 && firstChunk % chunkCount == 0
            && firstChunk < geometry.chunkCount && chunks.upperBound <= geometry.chunkCount
    }

    package var description: String { "\(memoryNode):chunk\(firstChunk)+2^\(chunkCountLog2)" }

    /// The smallest power-of-two number of chunks (as log2) that holds `bytes`.
    package static func chunkCountLog2(forBytes bytes: UInt64) -> Int {
        let chunks = (bytes + PoolGeometry.chunkBytes - 1) / PoolGeometry.chunkBytes
        return chunks <= 1 ? 0 : 64 - (chunks - 1).leadingZeroBitCount
    }
}
