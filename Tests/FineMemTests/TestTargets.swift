import Testing
@testable import FineMem

/// A simulated NIC with a 1 MiB pool and one region at its start: the target most NIC and
/// simulation tests post to.
func makeTarget(node: UInt16 = 0, regionBytes: UInt64 = 4096, access: RemoteAccess = .all) throws -> (SimulatedNIC, ProtectionDomain, MemoryRegion) {
    let nic = try SimulatedNIC(node: NodeID(node), poolBytes: 1 << 20)
    let pd = nic.allocateProtectionDomain()
    let region = try nic.registerRegion(pd: pd, address: nic.baseAddress, length: regionBytes, access: access)
    return (nic, pd, region)
}

/// Runs `body` and records an error it throws as an issue of the current test, instead of
/// crashing the whole test process as `try!` would (a failure inside a simulated task must
/// fail one test, with its context).
func recordingErrors(_ context: @autoclosure () -> String, _ body: () async throws -> Void) async {
    do { try await body() } catch { Issue.record("\(context()): \(error)") }
}
