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
