@testable import FineMem

/// A simulated NIC with a 1 MiB pool and one region at its start: the target most NIC and
/// simulation tests post to.
func makeTarget(node: UInt16 = 0, regionBytes: UInt64 = 4096, access: RemoteAccess = .all) throws -> (SimulatedNIC, ProtectionDomain, MemoryRegion) {
    let nic = try SimulatedNIC(node: NodeID(node), poolBytes: 1 << 20)
    let pd = nic.allocateProtectionDomain()
    let region = try nic.registerRegion(pd: pd, address: nic.baseAddress, length: regionBytes, access: access)
    return (nic, pd, region)
}
