import Testing
@testable import FineMem
import FineMemHarness

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

/// Runs `body` as the one top-level task of a simulation with `seed` and answers what it
/// returned, or the error it threw; nil when the run ended without an answer (with
/// `deadlineNanos`, also when it had none by then: a hang fails instead of hanging).
func simulate<Value: Sendable>(
    seed: UInt64, deadlineNanos: UInt64 = .max, _ body: @escaping @Sendable (Simulator) async throws -> Value
) -> Result<Value, any Error>? {
    let simulator = Simulator(seed: seed)
    let outcome = Locked<Result<Value, any Error>?>(nil)
    simulator.spawn {
        do {
            let value = try await body(simulator)
            outcome.withLock { $0 = .success(value) }
        } catch {
            outcome.withLock { $0 = .failure(error) }
        }
    }
    simulator.run(untilNanoseconds: deadlineNanos)
    return outcome.withLock { $0 }
}

/// `simulate` bounded in virtual time (30 s by default): nil when it did not answer by then
/// (a hang fails the test instead of hanging it).
func simulateBounded<Value: Sendable>(
    seed: UInt64, deadlineNanos: UInt64 = 30_000_000_000, _ body: @escaping @Sendable (Simulator) async throws -> Value
) -> Result<Value, any Error>? {
    simulate(seed: seed, deadlineNanos: deadlineNanos, body)
}

/// The problems a bounded simulation answered, or why it answered none.
func problems(of result: Result<[String], any Error>?, deadline: String = "30 s") -> [String] {
    switch result {
    case .success(let problems): problems
    case .failure(let error): ["run threw: \(error)"]
    case nil: ["no answer within \(deadline) of virtual time (a hang)"]
    }
}

/// Waits (polling every 50 virtual nanoseconds, for at most `maxNanos`) until `condition`
/// holds; answers whether it did.
func waitUntil(_ simulator: Simulator, maxNanos: UInt64 = 20_000_000, _ condition: () -> Bool) async -> Bool {
    let deadline = simulator.nowNanoseconds + maxNanos
    while simulator.nowNanoseconds < deadline {
        if condition() { return true }
        await simulator.sleep(nanoseconds: 50)
    }
    return condition()
}

extension Simulator {
    /// Stalls compute node `index` of an embedded cluster for `nanoseconds` as soon as
    /// `reached` holds (looked at every 50 virtual nanoseconds, at most 100,000 times): the
    /// way a test freezes a node between two of its verbs. Answers whether it did.
    func stallComputeNode(_ index: Int, forNanoseconds nanoseconds: UInt64, when reached: () -> Bool) async -> Bool {
        for _ in 0..<100_000 {
            if reached() {
                faults.stall(EmbeddedCluster.computeNodeID(index), fromNanoseconds: nowNanoseconds, forNanoseconds: nanoseconds)
                return true
            }
            await sleep(nanoseconds: 50)
        }
        return false
    }
}

/// The lanes a compute node with `shards` cache shards has on the simulated NIC: a
/// connection per shard and one for the upkeep, or the one connection with one shard.
func lanesOfShards(_ shards: Int) -> Int { shards > 1 ? shards + 1 : 1 }

/// What is wrong with `node`'s cache shards and lanes on memory node `memoryNode` for a
/// test that means to run on `shards` shards: the test's mark that the path it claims to
/// reach is there (a shard needs 4 sections of 2 MiB, so a small pool silently gets one
/// shard and one lane). Empty when they are as meant.
func laneProblems(_ node: BlockAllocator, shards: Int, memoryNode: Int = 0) -> [String] {
    let (hasShards, hasLanes) = (node.cacheShards(memoryNode: memoryNode), node.lanes(memoryNode: memoryNode))
    guard hasShards != shards || hasLanes != lanesOfShards(shards) else { return [] }
    return ["set-up: \(node.owner) has \(hasShards) cache shards and \(hasLanes) lanes on memory node \(memoryNode); "
        + "the test means \(shards) and \(lanesOfShards(shards)) (a shard needs 4 sections of 2 MiB)"]
}

/// A set-up that does not give a test what it means to test.
struct SetUpError: Error, CustomStringConvertible {
    let problems: [String]
    var description: String { problems.joined(separator: "; ") }
}

/// A compute node's connection whose batches go through `before` before they are posted,
/// `failsWhen` (true: the batch fails with `connectionBroken` instead, nothing posted),
/// and `after` once they executed, before their answers return: the node's CPU slow
/// between two doorbells, or an answer still on its way back. It opens no siblings, so
/// every lane of a link over it is this connection.
final class GatedConnection: FabricConnection, @unchecked Sendable {
    let inner: any FabricConnection
    let before: @Sendable ([Verb]) async -> Void
    let failsWhen: @Sendable ([Verb]) async -> Bool
    let after: @Sendable ([Verb]) async -> Void

    init(
        _ inner: any FabricConnection, before: @escaping @Sendable ([Verb]) async -> Void = { _ in },
        failsWhen: @escaping @Sendable ([Verb]) async -> Bool = { _ in false }, after: @escaping @Sendable ([Verb]) async -> Void = { _ in }
    ) {
        self.inner = inner
        self.before = before
        self.failsWhen = failsWhen
        self.after = after
    }

    var remoteNode: NodeID { inner.remoteNode }

    func post(_ verbs: [Verb]) async throws(FabricError) -> [VerbResult] {
        await before(verbs)
        if await failsWhen(verbs) { throw .connectionBroken(inner.remoteNode) }
        let results = try await inner.post(verbs)
        await after(verbs)
        return results
    }
}

/// Whether `verbs` hold a CAS on the word at `address`.
func casOn(_ address: RemoteAddress, in verbs: [Verb]) -> Bool {
    verbs.contains { verb in
        if case .compareAndSwap = verb { verb.address == address } else { false }
    }
}

/// Whether `verbs` are the first doorbell of a full refresh (they start with the READ of
/// every section header, and end with those of the room summary).
func isFullRead(_ verbs: [Verb], grant: MemoryNodeGrant) -> Bool {
    guard case .read = verbs.first, verbs.count >= 3 else { return false }
    return verbs[0].address == grant.address(of: .section(0)) && verbs[0].payloadBytes == grant.geometry.sectionCount * 8
        && verbs[verbs.count - 2].address == grant.roomSummaryAddress(word: 0)
}

/// A compute node of `cluster` with owner `owner`, attached to every memory node (or those
/// at `only`) through `gate`, started after the cluster's own nodes (its cache holds the
/// section words of that moment).
func startGatedNode(
    _ cluster: EmbeddedCluster, owner: OwnerID, id: NodeID, only: [Int]? = nil,
    gate: (Int, any FabricConnection) -> any FabricConnection = { $1 }
) async throws -> BlockAllocator {
    var links: [(MemoryNodeGrant, any FabricConnection)] = []
    for (index, memoryNode) in cluster.memoryNodes.enumerated() where only?.contains(index) ?? true {
        let (grant, connection) = try memoryNode.attach(computeNode: owner, from: id)
        links.append((grant, gate(index, connection)))
    }
    return try await BlockAllocator.start(owner: owner, memoryNodes: links, runtime: cluster.runtime)
}
