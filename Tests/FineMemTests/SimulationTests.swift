#if canImport(Glibc)
import Glibc
#endif
import Testing
@testable import FineMem
import FineMemHarness

/// Runs `taskCount` simulated tasks, each posting random batches of verbs to one of four
/// memory nodes, and answers the trace hash and final virtual time.
private func randomVerbRun(seed: UInt64, taskCount: Int) throws -> (hash: TraceHash, now: UInt64, verbs: UInt64) {
    let simulator = Simulator(seed: seed)
    var targets: [(SimulatedNIC, MemoryRegion, ProtectionDomain)] = []
    for n in 0..<4 {
        let (nic, pd, region) = try makeTarget(node: UInt16(n), regionBytes: 1 << 16)
        targets.append((nic, region, pd))
    }
    for task in 0..<taskCount {
        let (nic, region, pd) = targets[task % 4]
        let connection = nic.connect(from: NodeID(UInt16(100 + task % 32)), protectionDomain: pd, simulator: simulator)
        let seed = simulator.forkSeed()
        simulator.spawn {
            var random = SeededRandom(seed: seed)
            for _ in 0..<4 {
                await simulator.sleep(nanoseconds: random.next() % 5_000)
                let word = region.address + (random.next() % 64) * 8
                let verbs: [Verb] = [
                    .fetchAndAdd(word, delta: 1, rkey: region.rkey),
                    .compareAndSwap(word, expected: random.next() % 4, desired: UInt64(task), rkey: region.rkey),
                    .readWords(word, count: 2, rkey: region.rkey),
                ]
                await recordingErrors("seed \(simulator.seed)") { _ = try await connection.post(verbs) }
            }
        }
    }
    simulator.run()
    return (simulator.traceHash, simulator.nowNanoseconds, simulator.totalVerbs)
}

@Suite struct SimulationTests {
    @Test func sameSeedSameTraceOtherSeedOtherTrace() throws {
        let first = try randomVerbRun(seed: 7, taskCount: 1_200)
        let again = try randomVerbRun(seed: 7, taskCount: 1_200)
        let other = try randomVerbRun(seed: 8, taskCount: 1_200)
        #expect(first.verbs == 1_200 * 4 * 3)
        #expect(first.hash == again.hash && first.now == again.now, "seed 7 must reproduce bit for bit")
        #expect(first.hash != other.hash, "seeds 7 and 8 gave the same trace \(first.hash)")
    }

    @Test func virtualTimeFollowsTheLatencyModel() async throws {
        var latency = LatencyModel()
        latency.jitterFraction = 0
        let simulator = Simulator(seed: 1, latency: latency)
        let (nic, pd, region) = try makeTarget(node: 0)
        let connection = nic.connect(from: NodeID(1), protectionDomain: pd, simulator: simulator)
        let finished = Locked<UInt64>(0)
        simulator.spawn {
            await recordingErrors("seed \(simulator.seed)") {
                _ = try await connection.post([
                    .compareAndSwap(region.address, expected: 0, desired: 1, rkey: region.rkey),
                    .readWords(region.address, count: 1, rkey: region.rkey),
                ])
            }
            finished.withLock { $0 = simulator.nowNanoseconds }
        }
        simulator.run()
        let cas = latency.serviceNanos(.compareAndSwap(region.address, expected: 0, desired: 1, rkey: region.rkey))
        let read = latency.serviceNanos(.readWords(region.address, count: 1, rkey: region.rkey))
        let expected = 2 * latency.oneWayNanos + cas + read + UInt64(8 / latency.bytesPerNanosecond)
        #expect(finished.withLock { $0 } == expected)
    }

    /// When the node learns of the crash, memory holds exactly the verbs executed before
    /// it; the verbs it had posted may still land later (late verbs), in posting order.
    @Test func crashInsideBatchLeavesExactlyTheExecutedPrefix() throws {
        for crashAfter in 0...4 as ClosedRange<UInt64> {
            let simulator = Simulator(seed: 3)
            let (nic, pd, region) = try makeTarget(node: 0)
            let node = NodeID(5)
            let connection = nic.connect(from: node, protectionDomain: pd, simulator: simulator)
            simulator.faults.crash(node, afterVerbs: crashAfter)
            let outcome = Locked<(error: FabricError, words: [UInt64])?>(nil)
            @Sendable func words() -> [UInt64] { (0..<4).map { nic.peekWord(region.address + UInt64($0) * 8) } }
            simulator.spawn {
                do throws(FabricError) {
                    _ = try await connection.post((0..<4).map { .writeWord(region.address + UInt64($0) * 8, UInt64($0) + 1, rkey: region.rkey) })
                } catch {
                    outcome.withLock { $0 = (error, words()) }
                }
            }
            simulator.run()
            let executed = Int(min(crashAfter, 4))
            func prefix(_ count: Int) -> [UInt64] { (0..<4).map { $0 < count ? UInt64($0) + 1 : 0 } }
            let final = words()
            let landed = final.prefix { $0 != 0 }.count
            #expect(final == prefix(landed) && landed >= executed, "seed 3, crash after \(crashAfter): \(final)")
            if crashAfter < 4 {
                let seen = outcome.withLock { $0 }
                #expect(seen?.error == .localCrash(executedVerbs: executed), "seed 3, crash after \(crashAfter): \(String(describing: seen))")
                #expect(seen?.words == prefix(executed), "seed 3, crash after \(crashAfter): memory at the crash \(String(describing: seen))")
            }
            #expect(simulator.faults.isCrashed(node) == (crashAfter < 4))
        }
    }

    @Test func crashedNodePostsNothing() throws {
        let simulator = Simulator(seed: 4)
        let (nic, pd, region) = try makeTarget(node: 0)
        let connection = nic.connect(from: NodeID(5), protectionDomain: pd, simulator: simulator)
        simulator.faults.crash(NodeID(5), atNanoseconds: 10_000)
        simulator.spawn {
            for i in 0..<100 {
                do throws(FabricError) { _ = try await connection.fetchAndAdd(region.address, delta: 1, rkey: region.rkey) } catch {
                    // Either the post found the node crashed, or the verb executed and the
                    // node crashed before its completion arrived.
                    #expect(error == .localCrash(executedVerbs: 0) || error == .localCrash(executedVerbs: 1))
                    #expect(i > 0)
                    return
                }
            }
            Issue.record("the node never crashed")
        }
        simulator.run()
        let count = nic.peekWord(region.address)
        #expect(count > 0 && count < 100)
        #expect(simulator.nowNanoseconds < 20_000)
    }

    @Test func stallDelaysTheNodeOnly() throws {
        var latency = LatencyModel()
        latency.jitterFraction = 0
        let simulator = Simulator(seed: 5, latency: latency)
        let (nic, pd, region) = try makeTarget(node: 0)
        let stalled = nic.connect(from: NodeID(1), protectionDomain: pd, simulator: simulator)
        let free = nic.connect(from: NodeID(2), protectionDomain: pd, simulator: simulator)
        simulator.faults.stall(NodeID(1), fromNanoseconds: 0, forNanoseconds: 1_000_000)
        let times = Locked<[UInt16: UInt64]>([:])
        for (node, connection) in [(UInt16(1), stalled), (UInt16(2), free)] {
            simulator.spawn {
                await recordingErrors("seed \(simulator.seed)") { _ = try await connection.fetchAndAdd(region.address, delta: 1, rkey: region.rkey) }
                times.withLock { $0[node] = simulator.nowNanoseconds }
            }
        }
        simulator.run()
        let t = times.withLock { $0 }
        #expect(t[2]! < 10_000)
        #expect(t[1]! >= 1_000_000)
    }

    @Test func brokenConnectionFailsLaterBatches() async throws {
        let simulator = Simulator(seed: 6)
        let (nic, pd, region) = try makeTarget(node: 0)
        let connection = nic.connect(from: NodeID(1), protectionDomain: pd, simulator: simulator)
        let errors = Locked<[FabricError]>([])
        simulator.spawn {
            await recordingErrors("seed \(simulator.seed)") { _ = try await connection.fetchAndAdd(region.address, delta: 1, rkey: region.rkey) }
            connection.breakConnection()
            do throws(FabricError) { _ = try await connection.fetchAndAdd(region.address, delta: 1, rkey: region.rkey) } catch {
                errors.withLock { $0.append(error) }
            }
        }
        simulator.run()
        #expect(errors.withLock { $0 } == [.connectionBroken(NodeID(0))])
        #expect(nic.peekWord(region.address) == 1)
    }
}

@Suite struct VerbsDeviceTests {
    /// The listing agrees with what the kernel shows in /sys/class/infiniband: no device
    /// where there is none (ENOSYS or no entries: these machines), and every device there
    /// otherwise, by name.
    @Test func listingDevicesAgreesWithTheKernel() throws {
        let devices = try VerbsDevices.list()
        var kernelDevices: [String] = []
        if let directory = opendir("/sys/class/infiniband") {
            defer { closedir(directory) }
            while let entry = readdir(directory) {
                let name = withUnsafeBytes(of: entry.pointee.d_name) { String(decoding: $0.prefix { $0 != 0 }, as: UTF8.self) }
                if name != ".", name != ".." { kernelDevices.append(name) }
            }
        }
        #expect(devices.map(\.name).sorted() == kernelDevices.sorted())
    }
}

@Suite struct PeerDeathTests {
    @Test func poweredOffMemoryNodeAnswersPeerDead() async throws {
        let (nic, pd, region) = try makeTarget(node: 3)
        let connection = nic.connect(from: NodeID(1), protectionDomain: pd)
        _ = try await connection.fetchAndAdd(region.address, delta: 1, rkey: region.rkey)
        nic.powerOff()
        await #expect(throws: FabricError.peerDead(NodeID(3))) { _ = try await connection.fetchAndAdd(region.address, delta: 1, rkey: region.rkey) }
        #expect(nic.peekWord(region.address) == 1)
    }

    @Test func crashedMemoryNodeAnswersPeerDeadInVirtualTime() throws {
        let simulator = Simulator(seed: 11)
        let (nic, pd, region) = try makeTarget(node: 3)
        let connection = nic.connect(from: NodeID(1), protectionDomain: pd, simulator: simulator)
        simulator.faults.crash(NodeID(3), atNanoseconds: 50_000)
        let errors = Locked<[FabricError]>([])
        simulator.spawn {
            for _ in 0..<100 {
                do throws(FabricError) { _ = try await connection.fetchAndAdd(region.address, delta: 1, rkey: region.rkey) } catch {
                    errors.withLock { $0.append(error) }
                    return
                }
            }
        }
        simulator.run()
        #expect(errors.withLock { $0 } == [.peerDead(NodeID(3))])
        #expect(nic.peekWord(region.address) > 0 && nic.peekWord(region.address) < 100)
    }
}

/// A compute node stalls right after a commit, with its temporary log still pending.
@Suite struct StalledFlusherTests {
    /// Runs: CN 1 allocates 4 KiB and stalls for 1 ms before its flush; CN 2 allocates
    /// meanwhile; optionally the memory node fences CN 1 during the stall. Answers the
    /// inspector and both blocks.
    private func stalledRun(fence: Bool) throws -> (PoolInspector, Block, Block) {
        let simulator = Simulator(seed: 21)
        let outcome = Locked<Result<(PoolInspector, Block, Block), any Error>?>(nil)
        simulator.spawn {
            do {
                let cluster = try await EmbeddedCluster.start(.init(memoryNodes: 1, poolBytesPerNode: 2 << 20, computeNodes: 2), simulator: simulator)
                let first = try await cluster.computeNodes[0].allocate(chunkCountLog2: 0, application: ApplicationID(1))
                simulator.faults.stall(EmbeddedCluster.computeNodeID(0), fromNanoseconds: simulator.nowNanoseconds, forNanoseconds: 1_000_000)
                let second = try await cluster.computeNodes[1].allocate(chunkCountLog2: 0, application: ApplicationID(1))
                if fence { try await cluster.fence(computeNode: 0) }
                await simulator.sleep(nanoseconds: 2_000_000)
                await cluster.quiesce()
                outcome.withLock { $0 = .success((PoolInspector(cluster: cluster), first, second)) }
            } catch {
                outcome.withLock { $0 = .failure(error) }
            }
        }
        simulator.run()
        return try #require(outcome.withLock { $0 }, "seed 21: the run did not finish").get()
    }

    @Test func othersAllocateAroundThePendingLogAndTheLateFlushLands() throws {
        let (inspector, first, second) = try stalledRun(fence: false)
        #expect(first.chunks.overlaps(second.chunks) == false)
        #expect(first.firstChunk / 32 != second.firstChunk / 32, "the other node must not commit on a header with a pending log")
        #expect(inspector.admit(first, owner: OwnerID(1)) == [])
        #expect(inspector.admit(second, owner: OwnerID(2)) == [])
        #expect(inspector.checkAtRest() == [])
        #expect(inspector.record(on: first.memoryNode, chunk: first.firstChunk)?.owner == OwnerID(1))
    }

    @Test func aFencedNodesLateFlushIsDiscarded() throws {
        let (inspector, first, second) = try stalledRun(fence: true)
        let span = try #require(inspector.span(on: first.memoryNode, section: first.section, span: first.spanInSection))
        #expect(span.logPending && span.log.owner == OwnerID(1), "the fenced node's log stays pending, for recovery")
        #expect(inspector.record(on: first.memoryNode, chunk: first.firstChunk) == .never, "the fenced node's late flush must not land")
        let record = try #require(inspector.record(on: second.memoryNode, chunk: second.firstChunk))
        #expect(record.isAllocated && record.owner == OwnerID(2))
    }
}

@Suite struct QueuePairOrderTests {
    /// A connection's batches execute in posting order even when a verb of the earlier
    /// batch waits for the NIC's atomic unit (busy with another connection's atomics).
    @Test func laterBatchNeverOvertakesAnEarlierOne() throws {
        let simulator = Simulator(seed: 8)
        let (nic, pd, region) = try makeTarget(node: 0)
        let ordered = nic.connect(from: NodeID(1), protectionDomain: pd, simulator: simulator)
        let noisy = nic.connect(from: NodeID(2), protectionDomain: pd, simulator: simulator)
        let word = region.address
        let other = region.address + 64
        let answers = Locked<[Bool]>([])
        // Keep the atomic unit busy.
        simulator.spawn {
            await recordingErrors("seed \(simulator.seed)") { _ = try await noisy.post((0..<200).map { _ in .fetchAndAdd(other, delta: 1, rkey: region.rkey) }) }
        }
        simulator.spawn {
            await recordingErrors("seed \(simulator.seed)") {
                let results = try await ordered.post([.writeWord(word, 1, rkey: region.rkey), .compareAndSwap(word, expected: 1, desired: 2, rkey: region.rkey)])
                answers.withLock { $0.append(results[1].compareAndSwap.exchanged) }
            }
        }
        simulator.spawn {
            await recordingErrors("seed \(simulator.seed)") {
                let results = try await ordered.post([.compareAndSwap(word, expected: 2, desired: 3, rkey: region.rkey)])
                answers.withLock { $0.append(results[0].compareAndSwap.exchanged) }
            }
        }
        simulator.run()
        #expect(answers.withLock { $0 } == [true, true])
        #expect(nic.peekWord(word) == 3)
    }
}
