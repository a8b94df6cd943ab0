/// What a compute node receives when it attaches to a memory node: the pool's geometry,
/// its connection, and the keys of its two regions (metadata, data).
public struct MemoryNodeGrant: Sendable, Hashable {
    public let memoryNode: NodeID
    public let geometry: PoolGeometry
    /// NIC address of the pool's first byte (offset 0 of the geometry).
    public let baseAddress: RemoteAddress
    /// Region over the metadata area: read, write, atomic. Held by the trusted service only.
    public let metadataKey: RKey
    /// Region over the data area: read, write. Handed to applications until per-block
    /// windows exist.
    public let dataKey: RKey

    public func address(_ offset: UInt64) -> RemoteAddress { baseAddress + offset }
}

/// Errors of memory-node set-up.
public enum MemoryNodeError: Error, Sendable, Hashable {
    case nic(SimulatedNICError)
    case layout(LayoutError)
    case fabric(FabricError)
    case computeNodeSlotOutOfRange(OwnerID)
}

/// A memory node on a simulated NIC: owns the pool, formats its metadata and registers one
/// metadata region and one data region per compute node (each in its own protection
/// domain, so deregistering them fences that node alone).
///
/// Every metadata word it writes goes through its NIC over a loopback connection, never
/// a CPU store: RDMA atomics are atomic only against other RDMA atomics of the same NIC.
/// The words that formatting leaves zero are already zero in a fresh anonymous mapping.
///
/// ```swift
/// let memoryNode = try await MemoryNode.format(id: NodeID(0), geometry: PoolGeometry(dataBytes: 1 << 30))
/// let (grant, connection) = try memoryNode.attach(computeNode: OwnerID(1))
/// ```
public final class MemoryNode: Sendable {
    public let id: NodeID
    public let geometry: PoolGeometry
    public let nic: SimulatedNIC
    private let loopbackRegion: MemoryRegion
    private let loopback: SimulatedConnection
    private let attachments = Locked<[OwnerID: (MemoryRegion, MemoryRegion)]>([:])

    private init(id: NodeID, geometry: PoolGeometry) throws(MemoryNodeError) {
        self.id = id
        self.geometry = geometry
        do {
            nic = try SimulatedNIC(node: id, poolBytes: geometry.totalBytes)
            let pd = nic.allocateProtectionDomain()
            loopbackRegion = try nic.registerRegion(pd: pd, address: nic.baseAddress, length: geometry.metadataBytes, access: .all)
            loopback = nic.connect(from: id, protectionDomain: pd)
        } catch {
            throw .nic(error)
        }
    }

    /// Maps a pool of `geometry` and writes its superblock and empty node table.
    public static func format(id: NodeID, geometry: PoolGeometry, epoch: UInt64 = 1) async throws(MemoryNodeError) -> MemoryNode {
        let node = try MemoryNode(id: id, geometry: geometry)
        let superblock = Superblock(geometry: geometry, epoch: epoch)
        var bytes: [UInt8] = []
        for word in superblock.words { bytes += word.littleEndianBytes }
        do {
            try await node.loopback.write(node.nic.baseAddress, bytes: bytes, rkey: node.loopbackRegion.rkey)
        } catch {
            throw .fabric(error)
        }
        return node
    }

    /// Registers the regions of compute node `owner` and opens its connection (in virtual
    /// time when `simulator` is given).
    public func attach(computeNode owner: OwnerID, simulator: Simulator? = nil) throws(MemoryNodeError) -> (MemoryNodeGrant, SimulatedConnection) {
        guard Int(owner.rawValue) < geometry.computeNodeSlots else { throw .computeNodeSlotOutOfRange(owner) }
        let pd = nic.allocateProtectionDomain()
        let metadata: MemoryRegion
        let data: MemoryRegion
        do {
            metadata = try nic.registerRegion(pd: pd, address: nic.baseAddress, length: geometry.metadataBytes, access: .all)
            data = try nic.registerRegion(
                pd: pd, address: nic.baseAddress + geometry.dataOffset, length: geometry.dataBytes, access: [.read, .write])
        } catch {
            throw .nic(error)
        }
        attachments.withLock { $0[owner] = (metadata, data) }
        let grant = MemoryNodeGrant(
            memoryNode: id, geometry: geometry, baseAddress: nic.baseAddress, metadataKey: metadata.rkey, dataKey: data.rkey)
        return (grant, nic.connect(from: NodeID(1000 + owner.rawValue), protectionDomain: pd, simulator: simulator))
    }

    /// Fences compute node `owner`: deregisters its regions, so nothing it posts from now on
    /// reaches the pool.
    public func fence(computeNode owner: OwnerID) throws(MemoryNodeError) {
        guard let (metadata, data) = attachments.withLock({ $0.removeValue(forKey: owner) }) else { return }
        do {
            try nic.deregister(metadata)
            try nic.deregister(data)
        } catch {
            throw .nic(error)
        }
    }
}
