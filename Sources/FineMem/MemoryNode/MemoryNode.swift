/// Errors of memory-node set-up.
package enum MemoryNodeError: Error, Sendable, Hashable, CustomStringConvertible {
    case nic(NICControlError)
    case fabric(FabricError)
    case poolTooSmall(poolBytes: UInt64, needed: UInt64)
    case computeNodeSlotOutOfRange(OwnerID)

    package var description: String {
        switch self {
        case .nic(let error): "NIC: \(error)"
        case .fabric(let error): "fabric: \(error)"
        case .poolTooSmall(let pool, let needed): "the NIC serves \(pool) bytes, the geometry needs \(needed)"
        case .computeNodeSlotOutOfRange(let owner): "\(owner) is outside the node table"
        }
    }
}

/// A memory node: owns a pool through its NIC's control path, formats its metadata, and
/// registers one metadata region and one data region per compute node (each in its own
/// protection domain, so fencing one compute node touches nobody else).
///
/// Every metadata word it writes goes through its NIC over a loopback connection, never
/// a CPU store: RDMA atomics are atomic only against other RDMA atomics of the same NIC.
/// The words that formatting leaves zero are already zero in a fresh anonymous mapping.
///
/// ```swift
/// let nic = try SimulatedNIC(node: NodeID(0), poolBytes: geometry.totalBytes)
/// let memoryNode = try await MemoryNode.format(nic: nic, geometry: geometry)
/// let (grant, connection) = try memoryNode.attach(computeNode: OwnerID(1), from: NodeID(1001))
/// ```
package final class MemoryNode: Sendable {
    package let geometry: PoolGeometry
    package let nic: any NICControl
    private let loopbackRegion: MemoryRegion
    private let loopback: any FabricConnection
    private let attachments = Locked<[OwnerID: (metadata: MemoryRegion, data: MemoryRegion)]>([:])

    package var id: NodeID { nic.node }

    private init(nic: any NICControl, geometry: PoolGeometry) throws(MemoryNodeError) {
        guard nic.poolBytes >= geometry.totalBytes else { throw .poolTooSmall(poolBytes: nic.poolBytes, needed: geometry.totalBytes) }
        self.nic = nic
        self.geometry = geometry
        do {
            let pd = try nic.allocateProtectionDomain()
            loopbackRegion = try nic.registerRegion(pd: pd, address: nic.baseAddress, length: geometry.metadataBytes, access: .all)
            loopback = try nic.openLoopback(protectionDomain: pd)
        } catch {
            throw .nic(error)
        }
    }

    /// Takes the pool `nic` serves and writes its superblock; the node table and every
    /// header start as zero words (free slots, empty sections and spans).
    package static func format(nic: any NICControl, geometry: PoolGeometry, epoch: UInt64 = 1) async throws(MemoryNodeError) -> MemoryNode {
        let node = try MemoryNode(nic: nic, geometry: geometry)
        let superblock = Superblock(geometry: geometry, epoch: epoch)
        let bytes = superblock.words.flatMap(\.littleEndianBytes)
        do {
            try await node.loopback.write(nic.baseAddress, bytes: bytes, rkey: node.loopbackRegion.rkey)
        } catch {
            throw .fabric(error)
        }
        return node
    }

    /// Registers the regions of compute node `owner` (in a protection domain of its own)
    /// and opens its connection from fabric node `node`.
    package func attach(computeNode owner: OwnerID, from node: NodeID) throws(MemoryNodeError) -> (MemoryNodeGrant, any FabricConnection) {
        guard Int(owner.rawValue) < geometry.computeNodeSlots else { throw .computeNodeSlotOutOfRange(owner) }
        let metadata: MemoryRegion
        let data: MemoryRegion
        let pd: ProtectionDomain
        do {
            pd = try nic.allocateProtectionDomain()
            metadata = try nic.registerRegion(pd: pd, address: nic.baseAddress, length: geometry.metadataBytes, access: .all)
            data = try nic.registerRegion(pd: pd, address: nic.baseAddress + geometry.dataOffset, length: geometry.dataBytes, access: [.read, .write])
        } catch {
            throw .nic(error)
        }
        let connection: any FabricConnection
        do { connection = try nic.openConnection(from: node, protectionDomain: pd) } catch {
            try? nic.deregister(metadata)
            try? nic.deregister(data)
            throw .nic(error)
        }
        attachments.withLock { $0[owner] = (metadata, data) }
        let grant = MemoryNodeGrant(memoryNode: id, geometry: geometry, baseAddress: nic.baseAddress, metadataKey: metadata.rkey, dataKey: data.rkey)
        return (grant, connection)
    }

    /// Fences compute node `owner`: first moves its connections to the error state, so
    /// that no verb it posted, even one still in flight from before a crash, executes from
    /// now on; then deregisters its regions, so that its keys are unknown. When this
    /// returns, nothing the node posted or posts reaches the pool. A later `attach` of the
    /// same compute node is a new incarnation: new protection domain, new keys, new
    /// connection. Fencing a node that is not attached does nothing.
    package func fence(computeNode owner: OwnerID) throws(MemoryNodeError) {
        guard let regions = attachments.withLock({ $0.removeValue(forKey: owner) }) else { return }
        do {
            try nic.breakConnections(of: regions.metadata.protectionDomain)
            try nic.deregister(regions.metadata)
            try nic.deregister(regions.data)
        } catch {
            throw .nic(error)
        }
    }
}
