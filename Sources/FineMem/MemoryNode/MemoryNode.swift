/// Errors of memory-node set-up.
package enum MemoryNodeError: Error, Sendable, Hashable, CustomStringConvertible {
    case nic(NICControlError)
    case fabric(FabricError)
    case poolTooSmall(poolBytes: UInt64, needed: UInt64)
    case computeNodeSlotOutOfRange(OwnerID)
    case recovery(RecoveryError)
    case recoveryInProgress(OwnerID)

    package var description: String {
        switch self {
        case .nic(let error): "NIC: \(error)"
        case .fabric(let error): "fabric: \(error)"
        case .poolTooSmall(let pool, let needed): "the NIC serves \(pool) bytes, the geometry needs \(needed)"
        case .computeNodeSlotOutOfRange(let owner): "\(owner) is outside the node table"
        case .recovery(let error): "recovery: \(error)"
        case .recoveryInProgress(let owner): "a recovery of \(owner) is already running on this memory node"
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
    /// The queue pair recovery runs on: the memory node's own, through its NIC like any
    /// other (in virtual time, with the latency model's crossings), so that recovery
    /// interleaves with the live nodes' verbs as it does on hardware.
    private let recoveryConnection: any FabricConnection
    /// The recoverer of each compute node being recovered: at most one at a time per node
    /// (`recover`, `recoveryAccess(for:from:)`).
    private let recoverers = Locked<[OwnerID: Recoverer]>([:])
    /// Every attachment ever granted to each compute node and not yet fenced: one per
    /// attach, whether the node then took its slot or not (a restart that found the slot
    /// still held by the old incarnation leaves both incarnations' regions here). A fence
    /// breaks and deregisters all of them.
    private let attachments = Locked<[OwnerID: [(metadata: MemoryRegion, data: MemoryRegion)]]>([:])

    package var id: NodeID { nic.node }

    private init(nic: any NICControl, geometry: PoolGeometry) throws(MemoryNodeError) {
        guard nic.poolBytes >= geometry.totalBytes else { throw .poolTooSmall(poolBytes: nic.poolBytes, needed: geometry.totalBytes) }
        self.nic = nic
        self.geometry = geometry
        do {
            let pd = try nic.allocateProtectionDomain()
            loopbackRegion = try nic.registerRegion(pd: pd, address: nic.baseAddress, length: geometry.metadataBytes, access: .all)
            loopback = try nic.openLoopback(protectionDomain: pd)
            recoveryConnection = try nic.openConnection(from: nic.node, protectionDomain: pd)
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
        attachments.withLock { $0[owner, default: []].append((metadata, data)) }
        let grant = MemoryNodeGrant(memoryNode: id, geometry: geometry, baseAddress: nic.baseAddress, metadataKey: metadata.rkey, dataKey: data.rkey)
        return (grant, connection)
    }

    /// Takes back an attachment of `owner` that was never used: the one `grant` came
    /// with, when the node could not take its slot (a restart while the old incarnation
    /// holds it, two nodes configured with one slot). Its queue pairs go to the error state
    /// and its keys are deregistered; other attachments of the node stay. A grant this
    /// memory node no longer holds (fenced since) is ignored.
    package func detach(computeNode owner: OwnerID, grant: MemoryNodeGrant) throws(MemoryNodeError) {
        let regions = attachments.withLock { attachments -> (metadata: MemoryRegion, data: MemoryRegion)? in
            guard let index = attachments[owner]?.firstIndex(where: { $0.metadata.rkey == grant.metadataKey }) else { return nil }
            return attachments[owner]!.remove(at: index)
        }
        guard let regions else { return }
        do {
            try nic.breakConnections(of: regions.metadata.protectionDomain)
            try nic.deregister(regions.metadata)
            try nic.deregister(regions.data)
        } catch {
            throw .nic(error)
        }
    }

    /// The grant of the memory node's own loopback access (metadata only).
    package var loopbackGrant: MemoryNodeGrant {
        MemoryNodeGrant(memoryNode: id, geometry: geometry, baseAddress: nic.baseAddress, metadataKey: loopbackRegion.rkey, dataKey: loopbackRegion.rkey)
    }

    /// Metadata access for a recoverer of compute node `owner` that runs elsewhere than on
    /// the memory node (a live compute node lending its CPU, or a test's crashing
    /// recoverer): a protection domain, metadata region and connection of its own.
    ///
    /// This is the recoverer's lease, and there is one at a time per node: an earlier
    /// recoverer of `owner` (another access, whether it finished, crashed or is only
    /// stalled) is fenced before the new access is granted, its queue pairs moved to the
    /// error state and its key deregistered, so that nothing it posted or posts reaches
    /// the pool; a recovery on the memory node itself that is running refuses the new one
    /// (`recoveryInProgress`). A recoverer that resumes after any stall decides nothing
    /// from then on: its verbs fail.
    package func recoveryAccess(for owner: OwnerID, from node: NodeID) throws(MemoryNodeError) -> RecoveryAccess {
        guard Int(owner.rawValue) < geometry.computeNodeSlots else { throw .computeNodeSlotOutOfRange(owner) }
        let access: RecoveryAccess
        do throws(NICControlError) {
            let pd = try nic.allocateProtectionDomain()
            let region = try nic.registerRegion(pd: pd, address: nic.baseAddress, length: geometry.metadataBytes, access: .all)
            let connection: any FabricConnection
            do { connection = try nic.openConnection(from: node, protectionDomain: pd) } catch {
                try? nic.deregister(region)
                throw error
            }
            let grant = MemoryNodeGrant(memoryNode: id, geometry: geometry, baseAddress: nic.baseAddress, metadataKey: region.rkey, dataKey: region.rkey)
            access = RecoveryAccess(owner: owner, grant: grant, connection: connection, region: region)
        } catch {
            throw .nic(error)
        }
        let earlier = recoverers.withLock { recoverers -> Result<RecoveryAccess?, MemoryNodeError> in
            switch recoverers[owner] {
            case .local?: return .failure(.recoveryInProgress(owner))
            case .remote(let earlier)?:
                recoverers[owner] = .remote(access)
                return .success(earlier)
            case nil:
                recoverers[owner] = .remote(access)
                return .success(nil)
            }
        }
        switch earlier {
        case .failure(let error):
            try? fenceRecoverer(access)
            throw error
        case .success(let earlier?):
            try fenceRecoverer(earlier)
        case .success(nil):
            break
        }
        return access
    }

    /// Ends recoverer `access` (its recovery finished or was given up): fences it as a new
    /// recoverer would, and frees its place.
    package func revoke(_ access: RecoveryAccess) throws(MemoryNodeError) {
        recoverers.withLock { recoverers in
            if case .remote(let current)? = recoverers[access.owner], current.region == access.region { recoverers[access.owner] = nil }
        }
        try fenceRecoverer(access)
    }

    /// Moves a recoverer's queue pairs to the error state, then deregisters its key.
    /// Fencing one twice does nothing more.
    private func fenceRecoverer(_ access: RecoveryAccess) throws(MemoryNodeError) {
        do {
            try nic.breakConnections(of: access.region.protectionDomain)
            try nic.deregister(access.region)
        } catch {
            if case .noSuchRegion = error { return }
            throw .nic(error)
        }
    }

    /// Fences compute node `owner`: first moves its connections to the error state, so
    /// that no verb it posted, even one still in flight from before a crash, executes from
    /// now on; then deregisters its regions, so that its keys are unknown; then declares
    /// its node-table slot dead (by CAS through the loopback), which is what recovery
    /// requires. When this returns, nothing the node posted or posts reaches the pool,
    /// whatever its clocks say: a node that resumes after a stall gets errors, and comes
    /// back only by attaching anew (new protection domain, keys and connection, and the
    /// next incarnation once recovery has freed its slot). Fencing a node that is not
    /// attached only makes sure its slot is not alive.
    package func fence(computeNode owner: OwnerID) async throws(MemoryNodeError) {
        guard Int(owner.rawValue) < geometry.computeNodeSlots else { throw .computeNodeSlotOutOfRange(owner) }
        // Every incarnation's queue pairs first (none of their verbs executes from now
        // on), then their keys.
        let granted = attachments.withLock { $0.removeValue(forKey: owner) ?? [] }
        do {
            for regions in granted { try nic.breakConnections(of: regions.metadata.protectionDomain) }
            for regions in granted {
                try nic.deregister(regions.metadata)
                try nic.deregister(regions.data)
            }
        } catch {
            throw .nic(error)
        }
        let address = loopbackGrant.nodeSlotAddress(owner)
        let link = MemoryNodeLink.acting(for: owner, incarnation: 0, grant: loopbackGrant, connection: loopback)
        var trace = OperationTrace()
        let outcome: UpdateOutcome<NodeSlot>
        do {
            let known = try await loopback.post([.readWords(address, count: 1, rkey: loopbackRegion.rkey)])[0].words[0]
            outcome = try await link.update(
                .word(address, known: known), UpdatePolicy(attemptsMax: Self.slotAttemptsMax, rereadOnRefusal: true), trace: &trace
            ) { $0.fencing() }
        } catch {
            throw .fabric(error)
        }
        if case .lost(let current) = outcome {
            throw .recovery(.corruptMetadata("the slot of \(owner) kept changing while it was fenced: \(current)"))
        }
    }

    /// Fences compute node `owner` if its slot still holds incarnation `incarnation`,
    /// alive or suspected: the lease monitor decides from a table read, and a node that
    /// was fenced, recovered and restarted as a new incarnation since (which never missed
    /// a renewal) is left alone. Answers whether it fenced.
    package func fenceExpired(computeNode owner: OwnerID, incarnation: UInt16) async throws(MemoryNodeError) -> Bool {
        guard Int(owner.rawValue) < geometry.computeNodeSlots else { throw .computeNodeSlotOutOfRange(owner) }
        let word: UInt64
        do {
            word = try await loopback.readWords(loopbackGrant.nodeSlotAddress(owner), count: 1, rkey: loopbackRegion.rkey)[0]
        } catch {
            throw .fabric(error)
        }
        guard let slot = NodeSlot(rawValue: word), slot.incarnation == incarnation, slot.state == .alive || slot.state == .suspected else {
            return false
        }
        try await fence(computeNode: owner)
        return true
    }

    /// Every slot of the node table, read through the loopback.
    package func readNodeTable() async throws(FabricError) -> [UInt64] {
        try await loopback.readWords(loopbackGrant.nodeSlotAddress(OwnerID(0)), count: geometry.computeNodeSlots, rkey: loopbackRegion.rkey)
    }

    /// Marks an alive node suspected (it missed a renewal), if its slot is still `known`.
    package func markSuspected(_ owner: OwnerID, known: UInt64) async throws(FabricError) -> Bool {
        let link = MemoryNodeLink.acting(for: owner, incarnation: 0, grant: loopbackGrant, connection: loopback)
        var trace = OperationTrace()
        let outcome: UpdateOutcome<NodeSlot> = try await link.update(.word(loopbackGrant.nodeSlotAddress(owner), known: known), UpdatePolicy(attemptsMax: 1), trace: &trace) { $0.suspecting() }
        if case .updated = outcome { return true }
        return false
    }

    /// CAS attempts on a node slot that keeps changing (a fenced node cannot change it;
    /// only a racing monitor could).
    private static let slotAttemptsMax = 16

    /// Recovers fenced compute node `owner` through the memory node's own queue pair
    /// (`PoolRecovery`): settles its logs, frees its blocks, frees its slot. This takes the
    /// node's recoverer lease: a remote recoverer of `owner` is fenced first (whatever it
    /// was doing), and a second recovery of `owner` here is refused while one runs.
    package func recover(computeNode owner: OwnerID, runtime: any Runtime) async throws(MemoryNodeError) -> RecoveryReport {
        guard Int(owner.rawValue) < geometry.computeNodeSlots else { throw .computeNodeSlotOutOfRange(owner) }
        let earlier = recoverers.withLock { recoverers -> Result<RecoveryAccess?, MemoryNodeError> in
            switch recoverers[owner] {
            case .local?: return .failure(.recoveryInProgress(owner))
            case .remote(let earlier)?:
                recoverers[owner] = .local
                return .success(earlier)
            case nil:
                recoverers[owner] = .local
                return .success(nil)
            }
        }
        let remote: RecoveryAccess?
        switch earlier {
        case .failure(let error): throw error
        case .success(let access): remote = access
        }
        defer {
            recoverers.withLock { recoverers in
                if case .local? = recoverers[owner] { recoverers[owner] = nil }
            }
        }
        if let remote { try fenceRecoverer(remote) }
        let access = RecoveryAccess(owner: owner, grant: loopbackGrant, connection: recoveryConnection, region: loopbackRegion)
        do {
            return try await PoolRecovery(access: access, runtime: runtime).run()
        } catch {
            throw .recovery(error)
        }
    }

    /// Fences, then recovers, compute node `owner`.
    package func fenceAndRecover(computeNode owner: OwnerID, runtime: any Runtime) async throws(MemoryNodeError) -> RecoveryReport {
        try await fence(computeNode: owner)
        return try await recover(computeNode: owner, runtime: runtime)
    }
}

/// Who is recovering a compute node on a memory node.
private enum Recoverer: Sendable {
    /// The memory node itself (`MemoryNode.recover`).
    case local
    /// A recoverer elsewhere, through this access.
    case remote(RecoveryAccess)
}
