/// A recoverer's access to a memory node's metadata for the recovery of one compute node
/// (`MemoryNode.recoveryAccess(for:from:)`): the only way to run `PoolRecovery`.
package struct RecoveryAccess: Sendable {
    /// The compute node this access recovers.
    package let owner: OwnerID
    package let grant: MemoryNodeGrant
    package let connection: any FabricConnection
    let region: MemoryRegion

    /// The same access with its connection seen through `interpose` (a test's pausing or
    /// crashing wrapper, a benchmark's timer); fencing the access still stops it.
    package func interposing(_ interpose: (any FabricConnection) -> any FabricConnection) -> RecoveryAccess {
        RecoveryAccess(owner: owner, grant: grant, connection: interpose(connection), region: region)
    }
}
