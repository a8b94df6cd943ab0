import Testing
@testable import FineMem
import FineMemHarness

/// Runs `body` in a simulation with `seed` (`simulate`); answers its result or throws.
private func simulated<Value: Sendable>(seed: UInt64, _ body: @escaping @Sendable (Simulator) async throws -> Value) throws -> Value {
    try #require(simulate(seed: seed, body), "seed \(seed): the run did not finish").get()
}

private let application = ApplicationID(1)
private let second: UInt64 = 1_000_000_000

/// Every metadata word of memory node 0 (superblock, node table, intents, headers, records).
private func metadataSnapshot(_ cluster: EmbeddedCluster) -> [UInt64] {
    let nic = cluster.nics[0]
    let words = Int(cluster.memoryNodes[0].geometry.metadataBytes / 8)
    return (0..<words).map { nic.peekWord(nic.baseAddress + UInt64($0 * 8)) }
}

@Suite struct RecoveryTests {
    /// Every operation kind, crashed after each of its verbs (both late-verb policies),
    /// with live load, then fenced, recovered and checked (`CrashPointEnumeration`). The
    /// full set (more seeds, in release) runs in `.ci/run`.
    @Test(arguments: CrashPointEnumeration.Operation.allCases)
    func everyCrashPointRecovers(_ operation: CrashPointEnumeration.Operation) {
        let summary = CrashPointEnumeration(seed: 1).run(operation)
        print(summary)
        #expect(summary.crashPoints >= 3, "\(operation.rawValue) ran too few verbs to be the operation meant")
        #expect(summary.violations == [], "seed \(summary.seed): \(summary.violations.prefix(5))")
    }

    /// A compute node commits a free and stalls for 10 virtual minutes before its flush.
    /// Its memory node's monitor fences and recovers it after three missed renewals, a
    /// live node goes on allocating; when the stalled node resumes it changes nothing (not
    /// one metadata word), every operation of it fails, and it comes back only anew.
    @Test func aNodeStalledForTenMinutesChangesNothingWhenItResumes() throws {
        let seed: UInt64 = 41
        try simulated(seed: seed) { simulator in
            var configuration = EmbeddedCluster.Configuration(memoryNodes: 1, poolBytesPerNode: 16 << 20, computeNodes: 2)
            configuration.leaseIntervalNanos = second
            let cluster = try await EmbeddedCluster.start(configuration, simulator: simulator)
            cluster.startFailureDetection()
            let stalled = cluster.computeNodes[0]
            let live = cluster.computeNodes[1]
            let stalledID = EmbeddedCluster.computeNodeID(0)
            let kept = try await stalled.allocate(chunkCountLog2: 0, application: application)
            let freed = try await stalled.allocate(chunkCountLog2: 3, application: application)
            await cluster.quiesce()
            // The free's commit is on the wire when the stall starts: it lands, its answer
            // waits ten minutes.
            simulator.faults.stall(stalledID, fromNanoseconds: simulator.nowNanoseconds + 1, forNanoseconds: 600 * second)
            simulator.spawn { try? await stalled.free(freed, application: application) }
            var liveBlocks: [Block] = []
            for _ in 0..<20 {
                liveBlocks.append(try await live.allocate(chunkCountLog2: 0, application: application))
                await simulator.sleep(nanoseconds: second / 2)
            }
            let recovered = cluster.monitors[0].events.contains { if case .recovered(OwnerID(1), _) = $0 { true } else { false } }
            #expect(recovered, "seed \(seed): the monitor did not recover the stalled node: \(cluster.monitors[0].events)")
            let inspector = PoolInspector(cluster: cluster)
            for block in liveBlocks { #expect(inspector.admit(block, owner: live.owner) == []) }
            // Quiet everyone else, then let the stalled node resume.
            await simulator.sleep(nanoseconds: 590 * second - simulator.nowNanoseconds)
            cluster.stopFailureDetection()
            await simulator.sleep(nanoseconds: 2 * second)
            await cluster.quiesce()
            let before = metadataSnapshot(cluster)
            await simulator.sleep(nanoseconds: 600 * second + 10 * second - simulator.nowNanoseconds)
            #expect(!simulator.faults.isCrashed(stalledID))
            await #expect(throws: AllocationError.self) { try await stalled.free(kept, application: application) }
            await #expect(throws: AllocationError.self) { _ = try await stalled.allocate(chunkCountLog2: 0, application: application) }
            await stalled.quiesce()
            #expect(metadataSnapshot(cluster) == before, "seed \(seed): the resumed node changed metadata")
            #expect(inspector.checkAtRest() == [], "seed \(seed)")
            // It comes back as a new incarnation, and everything frees to empty.
            let reborn = try await cluster.restart(computeNode: 0)
            let block = try await reborn.allocate(chunkCountLog2: 0, application: application)
            try await reborn.free(block, application: application)
            for block in liveBlocks {
                _ = inspector.release(block)
                try await live.free(block, application: application)
            }
            await cluster.quiesce()
            #expect(inspector.checkAtRest() == [], "seed \(seed)")
            #expect(inspector.everyHeaderEmpty() == [], "seed \(seed)")
            #expect(inspector.nodeSlot(on: NodeID(0), owner: OwnerID(1))?.incarnation == 2)
        }
    }

    /// A node stalled for less than its lease (half an interval, right after a commit)
    /// keeps its lease and finishes its operation when it resumes: nothing is fenced.
    @Test func aShortStallKeepsTheLease() throws {
        let seed: UInt64 = 42
        try simulated(seed: seed) { simulator in
            var configuration = EmbeddedCluster.Configuration(memoryNodes: 1, poolBytesPerNode: 16 << 20, computeNodes: 2)
            configuration.leaseIntervalNanos = second
            let cluster = try await EmbeddedCluster.start(configuration, simulator: simulator)
            cluster.startFailureDetection()
            let node = cluster.computeNodes[0]
            simulator.faults.stall(EmbeddedCluster.computeNodeID(0), fromNanoseconds: simulator.nowNanoseconds + 1, forNanoseconds: second / 2)
            let block = try await node.allocate(chunkCountLog2: 2, application: application)
            await simulator.sleep(nanoseconds: 5 * second)
            cluster.stopFailureDetection()
            await simulator.sleep(nanoseconds: 2 * second)
            await cluster.quiesce()
            #expect(cluster.monitors[0].events.allSatisfy { if case .suspected = $0 { true } else { false } }, "seed \(seed): \(cluster.monitors[0].events)")
            #expect(!node.isFenced)
            let inspector = PoolInspector(cluster: cluster)
            #expect(inspector.admit(block, owner: node.owner) == [])
            #expect(inspector.checkAtRest() == [], "seed \(seed)")
            try await node.free(block, application: application)
        }
    }

    /// Recovery runs unchanged from a live compute node's connection (its metadata key),
    /// not only from the memory node's loopback, and a second run finds the slot free.
    @Test func recoveryRunsFromALiveComputeNode() throws {
        let seed: UInt64 = 43
        try simulated(seed: seed) { simulator in
            let cluster = try await EmbeddedCluster.start(.init(memoryNodes: 1, poolBytesPerNode: 64 << 20, computeNodes: 2), simulator: simulator)
            let dead = cluster.computeNodes[0]
            var sizes = [0, 1, 2, 4, 5, 7, 9, 10, 11]
            sizes += sizes
            for size in sizes { _ = try await dead.allocate(chunkCountLog2: size, application: application) }
            await cluster.quiesce()
            try await cluster.fence(computeNode: 0)
            let memoryNode = cluster.memoryNodes[0]
            let access = try memoryNode.recoveryAccess(for: dead.owner, from: EmbeddedCluster.computeNodeID(1))
            let report = try await PoolRecovery(access: access, runtime: simulator).run()
            #expect(report.blocksReclaimed == sizes.count, "seed \(seed): \(report)")
            #expect(report.blocksByLayer == [8, 6, 4], "seed \(seed): \(report)")
            let again = try await PoolRecovery(access: memoryNode.recoveryAccess(for: dead.owner, from: EmbeddedCluster.computeNodeID(1)), runtime: simulator).run()
            #expect(again.alreadyRecovered)
            let inspector = PoolInspector(cluster: cluster)
            #expect(inspector.checkAtRest() == [], "seed \(seed)")
            #expect(inspector.everyHeaderEmpty() == [], "seed \(seed)")
        }
    }

    /// Recovery refuses a node that is not fenced, and changes nothing.
    @Test func recoveryRefusesALiveNode() throws {
        try simulated(seed: 44) { simulator in
            let cluster = try await EmbeddedCluster.start(.init(memoryNodes: 1, poolBytesPerNode: 8 << 20, computeNodes: 1), simulator: simulator)
            let block = try await cluster.computeNodes[0].allocate(chunkCountLog2: 0, application: application)
            await cluster.quiesce()
            let before = metadataSnapshot(cluster)
            await #expect(throws: MemoryNodeError.recovery(.notFenced(OwnerID(1), .alive))) {
                _ = try await cluster.recover(computeNode: 0)
            }
            #expect(metadataSnapshot(cluster) == before)
            try await cluster.computeNodes[0].free(block, application: application)
        }
    }

    /// A node that crashes is found by the monitor (missed renewals), fenced and
    /// recovered while a live node keeps allocating; its slot is free again afterwards.
    @Test func theMonitorRecoversACrashedNode() throws {
        let seed: UInt64 = 45
        try simulated(seed: seed) { simulator in
            var configuration = EmbeddedCluster.Configuration(memoryNodes: 2, poolBytesPerNode: 16 << 20, computeNodes: 2)
            configuration.leaseIntervalNanos = 1_000_000
            configuration.missedRenewalsMax = 3
            let cluster = try await EmbeddedCluster.start(configuration, simulator: simulator)
            cluster.startFailureDetection()
            for size in [0, 3, 6, 10] { _ = try await cluster.computeNodes[0].allocate(chunkCountLog2: size, application: application) }
            simulator.faults.crash(EmbeddedCluster.computeNodeID(0), atNanoseconds: simulator.nowNanoseconds + 10_000)
            let live = cluster.computeNodes[1]
            var held: [Block] = []
            for _ in 0..<40 {
                held.append(try await live.allocate(chunkCountLog2: 1, application: application))
                await simulator.sleep(nanoseconds: 200_000)
            }
            cluster.stopFailureDetection()
            await simulator.sleep(nanoseconds: 2_000_000)
            await cluster.quiesce()
            for monitor in cluster.monitors {
                #expect(monitor.events.contains { if case .recovered(OwnerID(1), let report) = $0 { report.blocksReclaimed > 0 } else { false } },
                        "seed \(seed): \(monitor.events)")
                #expect(!monitor.events.contains { if case .recovered(OwnerID(2), _) = $0 { true } else { false } }, "seed \(seed): the live node was recovered")
            }
            let inspector = PoolInspector(cluster: cluster)
            for block in held { #expect(inspector.admit(block, owner: live.owner) == []) }
            #expect(inspector.checkAtRest() == [], "seed \(seed)")
            for memoryNode in cluster.memoryNodes { #expect(inspector.nodeSlot(on: memoryNode.id, owner: OwnerID(1))?.state == .free) }
        }
    }
}
