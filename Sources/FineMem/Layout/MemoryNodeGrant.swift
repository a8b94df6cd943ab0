/// What a compute node receives when it attaches to a memory node: the pool's geometry,
/// its NIC address, and the keys of the compute node's two regions (metadata, data).
///
/// The metadata key reaches every metadata word of the pool: only the trusted allocation
/// code of a compute node holds a grant; applications see buffers and their keys.
package struct MemoryNodeGrant: Sendable, Hashable {
    package let memoryNode: NodeID
    package let geometry: PoolGeometry
    /// NIC address of the pool's first byte (offset 0 of the geometry).
    package let baseAddress: RemoteAddress
    /// Region over the metadata area: read, write, atomic.
    package let metadataKey: RKey
    /// Region over the data area: read, write. Handed out with buffers until per-block
    /// windows exist.
    package let dataKey: RKey

    package init(memoryNode: NodeID, geometry: PoolGeometry, baseAddress: RemoteAddress, metadataKey: RKey, dataKey: RKey) {
        self.memoryNode = memoryNode
        self.geometry = geometry
        self.baseAddress = baseAddress
        self.metadataKey = metadataKey
        self.dataKey = dataKey
    }

    package func address(_ offset: UInt64) -> RemoteAddress { baseAddress + offset }
    package func address(of header: HeaderSlot) -> RemoteAddress {
        switch header {
        case .section(let section): address(geometry.sectionHeaderOffset(section))
        case .span(let section, let span): address(geometry.spanHeaderOffset(section: section, span: span))
        }
    }
    package func recordAddress(chunk: Int) -> RemoteAddress { address(geometry.fullLogOffset(chunk: chunk)) }
    package func roomSummaryAddress(word: Int) -> RemoteAddress { address(geometry.roomSummaryOffset(word: word)) }
    package func roomSummaryTopAddress(word: Int) -> RemoteAddress { address(geometry.roomSummaryTopOffset(word: word)) }
    package func intentAddress(owner: OwnerID, slot: Int) -> RemoteAddress { address(geometry.intentOffset(owner: owner, slot: slot)) }
    package func nodeSlotAddress(_ owner: OwnerID) -> RemoteAddress { address(geometry.nodeSlotOffset(owner)) }
    package func dataAddress(chunk: Int) -> RemoteAddress { address(geometry.dataOffset(chunk: chunk)) }
    /// The first byte after the pool.
    package var endAddress: RemoteAddress { address(geometry.totalBytes) }

    /// The chunk whose first byte is `address`, if it is one in the data area.
    package func chunk(startingAt address: RemoteAddress) -> Int? {
        guard address >= baseAddress, let chunk = geometry.chunk(atDataOffset: address - baseAddress),
              geometry.dataOffset(chunk: chunk) == address - baseAddress
        else { return nil }
        return chunk
    }
}

/// One header word of a pool: a section header or a span header.
package enum HeaderSlot: Hashable, Sendable, CustomStringConvertible {
    case section(Int)
    case span(section: Int, span: Int)

    /// The header that commits `block`'s operations (its first section for a multi-section block).
    package init(committing block: Block) {
        switch block.layer {
        case .chunk: self = .span(section: block.section, span: block.spanInSection)
        case .section, .multiSection: self = .section(block.section)
        }
    }

    package var section: Int {
        switch self {
        case .section(let section), .span(let section, _): section
        }
    }

    /// A distinct non-negative integer per header of a pool (for tables keyed by header).
    package var key: Int {
        switch self {
        case .section(let section): section * (PoolGeometry.spansPerSection + 1)
        case .span(let section, let span): section * (PoolGeometry.spansPerSection + 1) + 1 + span
        }
    }

    /// The header whose `key` is `key`.
    package init(key: Int) {
        let (section, rest) = key.quotientAndRemainder(dividingBy: PoolGeometry.spansPerSection + 1)
        self = rest == 0 ? .section(section) : .span(section: section, span: rest - 1)
    }

    /// The first chunk the header covers.
    package var firstChunk: Int {
        switch self {
        case .section(let section): section * PoolGeometry.chunksPerSection
        case .span(let section, let span): section * PoolGeometry.chunksPerSection + span * PoolGeometry.chunksPerSpan
        }
    }

    package var description: String {
        switch self {
        case .section(let section): "section \(section)"
        case .span(let section, let span): "span \(section).\(span)"
        }
    }
}
