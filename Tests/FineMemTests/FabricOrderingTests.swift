import Testing
@testable import FineMem
import FineMemHarness

// The RDMA orderings that real NICs do not give, in virtual time: unfenced WRITEs that pass
// earlier READs and atomics, verbs that outlive a crashed host until it is fenced, and
// schedule exploration. Every sweep names the failing seeds in its message.

/// The seeds the sweeps run: a choice made with probability 1/2 comes out both ways in 50
/// seeds unless something forbids one (50 equal fair draws have a chance of 2^-49).
private let sweepSeeds = Array(1...50 as ClosedRange<UInt64>)

/// The default latency model without jitter, for exact virtual times.
private func exactLatency() -> LatencyModel {
    var latency = LatencyModel()
    latency.jitterFraction = 0
    return latency
}

/// The words at `address` and after, as the NIC holds them now.
private func words(_ nic: SimulatedNIC, at address: RemoteAddress, count: Int) -> [UInt64] {
    (0..<count).map { nic.peekWord(address + UInt64($0) * 8) }
}

/// `count` words, the first `landed` of which hold their 1-based index, the rest zero:
/// what a run of WRITEs of `index + 1` to word `index` leaves when a prefix of it landed.
private func landedPrefix(_ landed: Int, of count: Int) -> [UInt64] {
    (0..<count).map { $0 < landed ? UInt64($0) + 1 : 0 }
}

@Suite struct VerbFenceFlagTests {
    @Test func everyVerbIsUnfencedUnlessAsked() {
        let address = RemoteAddress(1 << 40)
        let key = RKey(index: 1, tag: 0)
        let verbs: [Verb] = [
            .read(address, length: 16, rkey: key), .write(address, bytes: [1, 2, 3], rkey: key),
            .compareAndSwap(address, expected: 1, desired: 2, rkey: key), .fetchAndAdd(address, delta: 3, rkey: key),
            .writeWord(address, 7, rkey: key), .readWords(address, count: 2, rkey: key),
        ]
        for verb in verbs {
            #expect(!verb.isFenced, "\(verb) is fenced by default")
            let fenced = verb.fenced()
            #expect(fenced.isFenced && fenced != verb && fenced.fenced() == fenced, "\(verb)")
            #expect(fenced.kind == verb.kind && fenced.address == verb.address && fenced.rkey == verb.rkey, "\(verb)")
            #expect(fenced.payloadBytes == verb.payloadBytes, "\(verb)")
        }
    }
}

/// The outcome of one virtual-time batch: its results (or error) and when it completed.
private struct BatchOutcome: Sendable {
    var result: Result<[VerbResult], FabricError>
    var completedNanoseconds: UInt64
}

/// Posts `verbs` as one batch on a fresh connection in virtual time with `seed` and
/// answers the outcome and the first `wordCount` words of the region after the run.
private func runBatch(_ verbs: (MemoryRegion) -> [Verb], seed: UInt64, latency: LatencyModel = LatencyModel(), wordCount: Int = 4) throws -> (BatchOutcome, [UInt64]) {
    let simulator = Simulator(seed: seed, latency: latency)
    let (nic, pd, region) = try makeTarget(node: 0)
    let connection = nic.connect(from: NodeID(1), protectionDomain: pd, simulator: simulator)
    let batch = verbs(region)
    let outcome = Locked<BatchOutcome?>(nil)
    simulator.spawn {
        let result: Result<[VerbResult], FabricError>
        do throws(FabricError) { result = .success(try await connection.post(batch)) } catch { result = .failure(error) }
        outcome.withLock { $0 = BatchOutcome(result: result, completedNanoseconds: simulator.nowNanoseconds) }
    }
    simulator.run()
    let finished = try #require(outcome.withLock { $0 }, "seed \(seed): the batch never completed")
    return (finished, words(nic, at: region.address, count: wordCount))
}

/// A compute node takes word x with a CAS (0 -> 1) and then WRITEs x := 2, which is right
/// only once the CAS has happened: if the WRITE passed it, the CAS finds 2 and fails.
/// Answers whether the WRITE went first (nil, with an issue recorded, for anything else).
private func writeWentBeforeTheCompareAndSwap(seed: UInt64, fenced: Bool, latency: LatencyModel = LatencyModel()) throws -> (passed: Bool, completedNanoseconds: UInt64)? {
    let (outcome, memory) = try runBatch({ region in
        let write = Verb.writeWord(region.address, 2, rkey: region.rkey)
        return [.compareAndSwap(region.address, expected: 0, desired: 1, rkey: region.rkey), fenced ? write.fenced() : write]
    }, seed: seed, latency: latency, wordCount: 1)
    let results: [VerbResult]
    switch outcome.result {
    case .success(let answers): results = answers
    case .failure(let error):
        Issue.record("seed \(seed): the batch failed: \(error)")
        return nil
    }
    guard results.count == 2, results[1] == .written, memory == [2] else {
        Issue.record("seed \(seed): results must come in posting order and x end as 2: \(results), x = \(memory)")
        return nil
    }
    switch results[0].compareAndSwap {
    case (true, 0): return (false, outcome.completedNanoseconds)
    case (false, 2): return (true, outcome.completedNanoseconds)
    case let other:
        Issue.record("seed \(seed): the CAS answered \(other), which no order of the two verbs gives")
        return nil
    }
}

@Suite struct WriteReorderingTests {
    @Test func anUnfencedWriteSometimesPassesAnEarlierCompareAndSwap() throws {
        var passed: [UInt64] = []
        var inOrder: [UInt64] = []
        for seed in sweepSeeds {
            guard let run = try writeWentBeforeTheCompareAndSwap(seed: seed, fenced: false) else { continue }
            if run.passed { passed.append(seed) } else { inOrder.append(seed) }
        }
        #expect(!passed.isEmpty, "seeds \(sweepSeeds.first!)...\(sweepSeeds.last!): the WRITE never passed the CAS")
        #expect(!inOrder.isEmpty, "seeds \(sweepSeeds.first!)...\(sweepSeeds.last!): the WRITE always passed the CAS")
    }

    @Test func aFencedWriteNeverPassesTheCompareAndSwap() throws {
        var passed: [UInt64] = []
        for seed in sweepSeeds {
            if let run = try writeWentBeforeTheCompareAndSwap(seed: seed, fenced: true), run.passed { passed.append(seed) }
        }
        #expect(passed.isEmpty, "seeds \(passed): a fenced WRITE passed the CAS before it")
    }

    /// Without jitter, the seed only decides the order; the batch completes at the same
    /// time either way. The fence costs the CAS's answer going back and the WRITE coming
    /// over: two one-way crossings.
    @Test func reorderingKeepsTheCompletionTimeAndTheFenceCostsTwoCrossings() throws {
        let latency = exactLatency()
        let key = RKey(index: 1, tag: 0)
        let cas = latency.serviceNanos(.compareAndSwap(RemoteAddress(0), expected: 0, desired: 1, rkey: key))
        let write = latency.serviceNanos(.writeWord(RemoteAddress(0), 2, rkey: key))
        let unfenced = 2 * latency.oneWayNanos + cas + write
        let fenced = 4 * latency.oneWayNanos + cas + write
        var orders: Set<Bool> = []
        for seed in sweepSeeds {
            if let run = try writeWentBeforeTheCompareAndSwap(seed: seed, fenced: false, latency: latency) {
                orders.insert(run.passed)
                #expect(run.completedNanoseconds == unfenced, "seed \(seed): completed at \(run.completedNanoseconds), not \(unfenced)")
            }
            if let run = try writeWentBeforeTheCompareAndSwap(seed: seed, fenced: true, latency: latency) {
                #expect(!run.passed && run.completedNanoseconds == fenced, "seed \(seed): fenced batch passed \(run.passed), completed at \(run.completedNanoseconds), not \(fenced)")
            }
        }
        #expect(orders == [false, true], "seeds \(sweepSeeds.first!)...\(sweepSeeds.last!) without jitter ran only \(orders)")
    }

    /// [FAA y += 10, WRITE y := 1, WRITE y := 2, READ y]: the WRITEs may pass the FAA, but
    /// never each other, and the READ passes neither. Every legal order is told apart by
    /// the FAA's answer: 0 (in order), 1 (the first WRITE passed), 2 (both passed).
    @Test func writesKeepTheirOrderAndNothingPassesAWrite() throws {
        var seen: [UInt64: [UInt64]] = [:]
        for seed in sweepSeeds {
            let (outcome, memory) = try runBatch({ region in
                let y = region.address
                return [
                    .fetchAndAdd(y, delta: 10, rkey: region.rkey), .writeWord(y, 1, rkey: region.rkey),
                    .writeWord(y, 2, rkey: region.rkey), .readWords(y, count: 1, rkey: region.rkey),
                ]
            }, seed: seed, wordCount: 1)
            guard case .success(let results) = outcome.result, results.count == 4, case .fetchAndAdd(let original) = results[0] else {
                Issue.record("seed \(seed): unexpected outcome \(outcome.result)")
                continue
            }
            let legal: [UInt64: (read: UInt64, final: UInt64)] = [0: (2, 2), 1: (2, 2), 2: (12, 12)]
            guard let expected = legal[original] else {
                Issue.record("seed \(seed): the FAA found \(original): a WRITE passed an earlier WRITE")
                continue
            }
            #expect(results[3].words == [expected.read] && memory == [expected.final],
                    "seed \(seed): FAA found \(original), READ saw \(results[3].words), y = \(memory): an order the rules forbid")
            seen[original, default: []].append(seed)
        }
        #expect(Set(seen.keys) == [0, 1, 2], "seeds \(sweepSeeds.first!)...\(sweepSeeds.last!) gave only the orders \(seen.keys.sorted())")
    }

    /// A WRITE of a later batch may pass a CAS of an earlier batch still queued on the same
    /// connection; its batch then completes no earlier than the CAS's.
    @Test func aWriteMayPassAnAtomicOfAnEarlierBatch() throws {
        var passed: [UInt64] = []
        for seed in sweepSeeds {
            let simulator = Simulator(seed: seed)
            let (nic, pd, region) = try makeTarget(node: 0)
            let connection = nic.connect(from: NodeID(1), protectionDomain: pd, simulator: simulator)
            let x = region.address
            let casAnswer = Locked<(exchanged: Bool, original: UInt64, at: UInt64)?>(nil)
            let writeDone = Locked<UInt64?>(nil)
            simulator.spawn {
                do throws(FabricError) {
                    let answer = try await connection.compareAndSwap(x, expected: 0, desired: 1, rkey: region.rkey)
                    casAnswer.withLock { $0 = (answer.exchanged, answer.original, simulator.nowNanoseconds) }
                } catch {
                    Issue.record("seed \(seed): CAS failed: \(error)")
                }
            }
            simulator.spawn {
                do throws(FabricError) {
                    try await connection.write(x, bytes: UInt64(2).littleEndianBytes, rkey: region.rkey)
                    writeDone.withLock { $0 = simulator.nowNanoseconds }
                } catch {
                    Issue.record("seed \(seed): WRITE failed: \(error)")
                }
            }
            simulator.run()
            guard let cas = casAnswer.withLock({ $0 }), let written = writeDone.withLock({ $0 }) else {
                Issue.record("seed \(seed): a batch never completed")
                continue
            }
            if cas.exchanged {
                #expect(cas.original == 0 && nic.peekWord(x) == 2, "seed \(seed): in order, x must end as 2")
            } else {
                #expect(cas.original == 2 && nic.peekWord(x) == 2, "seed \(seed): the CAS found \(cas.original)")
                #expect(written >= cas.at, "seed \(seed): the WRITE's batch completed at \(written), before the earlier CAS's at \(cas.at)")
                passed.append(seed)
            }
        }
        #expect(!passed.isEmpty, "seeds \(sweepSeeds.first!)...\(sweepSeeds.last!): a later batch's WRITE never passed the CAS")
    }

    /// Immediate mode (real threads) keeps posting order strictly.
    @Test func immediateModeNeverReorders() async throws {
        let (nic, pd, region) = try makeTarget(node: 0)
        let connection = nic.connect(from: NodeID(1), protectionDomain: pd)
        for round in 0..<50 {
            let word = region.address + UInt64(round) * 8
            let results = try await connection.post([
                .compareAndSwap(word, expected: 0, desired: 1, rkey: region.rkey), .writeWord(word, 2, rkey: region.rkey),
            ])
            #expect(results[0].compareAndSwap == (true, 0) && nic.peekWord(word) == 2, "round \(round): \(results)")
        }
    }
}

/// What a run of `crashRun` saw.
private struct CrashRun {
    /// Each batch's error, in posting order (nil: it succeeded).
    var errors: [FabricError?]
    /// The words when the first batch's task learned of the crash, and that time.
    var atCrash: [UInt64]?
    var notifiedNanoseconds: UInt64?
    var crashNanoseconds: UInt64?
    /// The words when the memory node fenced the node (nil without fencing).
    var atFence: [UInt64]?
    /// What a live node's connection in the fenced domain got afterwards.
    var liveAfterFence: FabricError?
    /// The words after the run.
    var final: [UInt64]
}

/// Compute node 5 posts `batchSizes.count` batches of WRITEs on one connection at time 0
/// (together one WRITE of `i + 1` to word `i` each) and crashes as `crash` says. With
/// `fenceAtNanoseconds`, a task of the memory node breaks the connections of the domain
/// then (and node 6, alive in the same domain, posts once more); with `fenceOnNotice`, the
/// domain is broken as soon as the first batch is answered `localCrash`.
private func crashRun(
    seed: UInt64, batchSizes: [Int], crash: (FaultPlan, NodeID) -> Void, fenceAtNanoseconds: UInt64? = nil, fenceOnNotice: Bool = false
) throws -> CrashRun {
    let simulator = Simulator(seed: seed)
    let (nic, pd, region) = try makeTarget(node: 0)
    let node = NodeID(5)
    let connection = nic.connect(from: node, protectionDomain: pd, simulator: simulator)
    let live = nic.connect(from: NodeID(6), protectionDomain: pd, simulator: simulator)
    let total = batchSizes.reduce(0, +)
    crash(simulator.faults, node)
    let run = Locked(CrashRun(errors: Array(repeating: nil, count: batchSizes.count), final: []))
    var first = 0
    for (batchIndex, size) in batchSizes.enumerated() {
        let verbs = (first..<first + size).map { Verb.writeWord(region.address + UInt64($0) * 8, UInt64($0) + 1, rkey: region.rkey) }
        first += size
        simulator.spawn {
            do throws(FabricError) { _ = try await connection.post(verbs) } catch {
                run.withLock { run in
                    run.errors[batchIndex] = error
                    if batchIndex == 0 {
                        run.atCrash = words(nic, at: region.address, count: total)
                        run.notifiedNanoseconds = simulator.nowNanoseconds
                        if fenceOnNotice { nic.breakConnections(of: pd) }
                    }
                }
            }
        }
    }
    if let fenceAtNanoseconds {
        simulator.spawn {
            await simulator.sleep(nanoseconds: fenceAtNanoseconds)
            nic.breakConnections(of: pd)
            run.withLock { $0.atFence = words(nic, at: region.address, count: total) }
            do throws(FabricError) {
                _ = try await live.fetchAndAdd(region.address + (4096 - 8), delta: 1, rkey: region.rkey)
            } catch {
                run.withLock { $0.liveAfterFence = error }
            }
        }
    }
    simulator.run()
    return run.withLock { run in
        run.crashNanoseconds = simulator.faults.crashTime(of: node)
        run.final = words(nic, at: region.address, count: total)
        return run
    }
}

/// The number of leading words that landed, when the words are exactly such a prefix.
private func landedCount(_ memory: [UInt64]) -> Int? {
    let landed = memory.prefix { $0 != 0 }.count
    return memory == landedPrefix(landed, of: memory.count) ? landed : nil
}

@Suite struct LateVerbTests {
    /// Crash after 2 of 7 posted WRITEs (batches of 4 and 3): both tasks learn at once;
    /// memory then holds exactly the 2; later, a prefix of the other 5 may land, in order.
    @Test func postedVerbsMayExecuteAfterTheCrash() throws {
        var lateSeeds: [UInt64] = []
        var droppedSeeds: [UInt64] = []
        for seed in sweepSeeds {
            let run = try crashRun(seed: seed, batchSizes: [4, 3], crash: { $0.crash($1, afterVerbs: 2) })
            #expect(run.errors == [.localCrash(executedVerbs: 2), .localCrash(executedVerbs: 0)], "seed \(seed): \(run.errors)")
            #expect(run.atCrash == landedPrefix(2, of: 7), "seed \(seed): memory when the crash was reported: \(run.atCrash ?? [])")
            #expect(run.notifiedNanoseconds != nil && run.notifiedNanoseconds == run.crashNanoseconds,
                    "seed \(seed): crash at \(run.crashNanoseconds ?? 0), reported at \(run.notifiedNanoseconds ?? 0)")
            guard let landed = landedCount(run.final), landed >= 2 else {
                Issue.record("seed \(seed): late verbs landed out of posting order: \(run.final)")
                continue
            }
            if landed > 2 { lateSeeds.append(seed) }
            if landed < 7 { droppedSeeds.append(seed) }
        }
        #expect(!lateSeeds.isEmpty, "seeds \(sweepSeeds.first!)...\(sweepSeeds.last!): no posted verb executed after the crash")
        #expect(!droppedSeeds.isEmpty, "seeds \(sweepSeeds.first!)...\(sweepSeeds.last!): every posted verb executed after the crash")
    }

    /// The same crash, with the node's connections broken the moment the crash is known:
    /// none of the 5 posted verbs lands, in any seed.
    @Test func fencingAtTheCrashStopsEveryPostedVerb() throws {
        for seed in sweepSeeds {
            let run = try crashRun(seed: seed, batchSizes: [4, 3], crash: { $0.crash($1, afterVerbs: 2) }, fenceOnNotice: true)
            #expect(run.errors == [.localCrash(executedVerbs: 2), .localCrash(executedVerbs: 0)], "seed \(seed): \(run.errors)")
            #expect(run.atCrash == landedPrefix(2, of: 7) && run.final == landedPrefix(2, of: 7),
                    "seed \(seed): at the crash \(run.atCrash ?? []), after the run \(run.final): a verb landed after the fence")
        }
    }

    /// Crash at 3 us in the middle of 64 WRITEs; the memory node breaks the domain's
    /// connections at 3.2 us. Nothing lands after that (the same seed without the fence
    /// lands more, for some seeds), and a live node's connection in the domain is broken.
    @Test func fencingStopsPostedVerbs() throws {
        var stoppedSeeds: [UInt64] = []
        for seed in sweepSeeds {
            let crash: (FaultPlan, NodeID) -> Void = { $0.crash($1, atNanoseconds: 3_000) }
            let fenced = try crashRun(seed: seed, batchSizes: [64], crash: crash, fenceAtNanoseconds: 3_200)
            let unfenced = try crashRun(seed: seed, batchSizes: [64], crash: crash)
            #expect(fenced.errors == [.localCrash(executedVerbs: landedCount(fenced.atCrash ?? []) ?? -1)], "seed \(seed): \(fenced.errors)")
            #expect(fenced.atFence == fenced.final, "seed \(seed): verbs landed after the fence")
            #expect(fenced.liveAfterFence == .connectionBroken(NodeID(0)), "seed \(seed): a live connection of the fenced domain got \(String(describing: fenced.liveAfterFence))")
            guard let withFence = landedCount(fenced.final), let without = landedCount(unfenced.final) else {
                Issue.record("seed \(seed): verbs landed out of posting order: \(fenced.final) / \(unfenced.final)")
                continue
            }
            #expect(without >= withFence, "seed \(seed): the unfenced run landed less (\(without)) than the fenced one (\(withFence))")
            if without > withFence { stoppedSeeds.append(seed) }
        }
        #expect(!stoppedSeeds.isEmpty, "seeds \(sweepSeeds.first!)...\(sweepSeeds.last!): no late verb was left for the fence to stop")
    }

    @Test func breakingADomainLeavesOtherDomainsAndLaterConnectionsAlone() async throws {
        let (nic, pd, region) = try makeTarget(node: 0)
        let broken = nic.connect(from: NodeID(1), protectionDomain: pd)
        let otherDomain = nic.allocateProtectionDomain()
        let otherRegion = try nic.registerRegion(pd: otherDomain, address: nic.baseAddress + 8192, length: 4096, access: .all)
        let other = nic.connect(from: NodeID(2), protectionDomain: otherDomain)
        _ = try await broken.fetchAndAdd(region.address, delta: 1, rkey: region.rkey)
        nic.breakConnections(of: pd)
        #expect(broken.isBroken)
        await #expect(throws: FabricError.connectionBroken(NodeID(0))) {
            _ = try await broken.fetchAndAdd(region.address, delta: 1, rkey: region.rkey)
        }
        #expect(try await other.fetchAndAdd(otherRegion.address, delta: 1, rkey: otherRegion.rkey) == 0)
        let later = nic.connect(from: NodeID(1), protectionDomain: pd)
        #expect(try await later.fetchAndAdd(region.address, delta: 1, rkey: region.rkey) == 1)
        #expect(nic.peekWord(region.address) == 2)
    }
}

@Suite struct MemoryNodeFenceTests {
    /// Fencing breaks the node's connection and revokes its keys; attaching it again is a
    /// new incarnation with new keys and a new connection, and the old keys stay unknown.
    @Test func aFencedComputeNodeReattachesWithNewKeys() async throws {
        let geometry = try PoolGeometry(dataBytes: 4 << 20, computeNodeSlots: 64)
        let nic = try SimulatedNIC(node: NodeID(0), poolBytes: geometry.totalBytes)
        let memoryNode = try await MemoryNode.format(nic: nic, geometry: geometry)
        let owner = OwnerID(1)
        let (old, oldConnection) = try memoryNode.attach(computeNode: owner, from: NodeID(1001))
        let data = old.baseAddress + geometry.dataOffset
        try await oldConnection.write(data, bytes: [1, 2, 3, 4, 5, 6, 7, 8], rkey: old.dataKey)
        _ = try await oldConnection.readWords(old.baseAddress, count: 1, rkey: old.metadataKey)

        try await memoryNode.fence(computeNode: owner)
        await #expect(throws: FabricError.connectionBroken(NodeID(0))) {
            try await oldConnection.write(data, bytes: [9, 9, 9, 9, 9, 9, 9, 9], rkey: old.dataKey)
        }
        #expect(nic.peekWord(data) == 0x0807_0605_0403_0201, "a fenced node's WRITE landed")
        try await memoryNode.fence(computeNode: owner)  // fencing twice does nothing

        let (new, newConnection) = try memoryNode.attach(computeNode: owner, from: NodeID(1001))
        #expect(new.metadataKey != old.metadataKey && new.dataKey != old.dataKey)
        #expect(try await newConnection.readWords(data, count: 1, rkey: new.dataKey) == [0x0807_0605_0403_0201])
        // Each probe gets a connection of its own (an access error breaks it): in the new
        // domain, and in the old one, where the keys worked before they were deregistered.
        let oldDomain = try #require(oldConnection as? SimulatedConnection).protectionDomain
        let newDomain = try #require(newConnection as? SimulatedConnection).protectionDomain
        #expect(newDomain != oldDomain)
        for oldKey in [old.metadataKey, old.dataKey] {
            for (domain, pd) in [("new", newDomain), ("old", oldDomain)] {
                let probe = nic.connect(from: NodeID(1001), protectionDomain: pd)
                let address = oldKey == old.dataKey ? data : old.baseAddress
                do throws(FabricError) {
                    _ = try await probe.readWords(address, count: 1, rkey: oldKey)
                    Issue.record("the old key \(oldKey) still works in the \(domain) domain")
                } catch {
                    guard case .remoteAccess(.unknownKey, _, _, _) = error else {
                        Issue.record("the old key \(oldKey) answered \(error) in the \(domain) domain, not unknownKey")
                        continue
                    }
                }
            }
        }
    }
}

/// Runs `taskCount` tasks, each posting four random batches (a WRITE, an FAA, a CAS and a
/// READ on a random word) to one of two NICs over connections shared by four tasks, with
/// `simulator`; answers the trace hash and the final virtual time.
private func mixedVerbRun(_ simulator: Simulator, taskCount: Int = 200) throws -> (hash: TraceHash, nanoseconds: UInt64) {
    var connections: [(SimulatedConnection, MemoryRegion)] = []
    for n in 0..<2 {
        let (nic, pd, region) = try makeTarget(node: UInt16(n), regionBytes: 1 << 16)
        for c in 0..<(taskCount / 8) {
            connections.append((nic.connect(from: NodeID(UInt16(100 + c)), protectionDomain: pd, simulator: simulator), region))
        }
    }
    for task in 0..<taskCount {
        let (connection, region) = connections[task % connections.count]
        let seed = simulator.forkSeed()
        simulator.spawn {
            var random = SeededRandom(seed: seed)
            for _ in 0..<4 {
                await simulator.sleep(nanoseconds: random.next() % 5_000)
                let word = region.address + (random.next() % 64) * 8
                _ = try? await connection.post([
                    .fetchAndAdd(word, delta: 1, rkey: region.rkey),
                    .compareAndSwap(word, expected: random.next() % 4, desired: UInt64(task), rkey: region.rkey),
                    .writeWord(word + 8, UInt64(task), rkey: region.rkey),
                    .readWords(word, count: 2, rkey: region.rkey),
                ])
            }
        }
    }
    simulator.run()
    return (simulator.traceHash, simulator.nowNanoseconds)
}

/// Nodes 1 and 2 race to CAS one word from 0 to their own number; node 2 starts
/// `headStartNanoseconds` after node 1. Answers the winner.
private func casRace(seed: UInt64, exploration: ScheduleExploration, headStartNanoseconds: UInt64 = 1_000) throws -> UInt64 {
    let simulator = Simulator(seed: seed, latency: LatencyModel(), exploration: exploration)
    let (nic, pd, region) = try makeTarget(node: 0)
    for node in 1...2 as ClosedRange<UInt64> {
        let connection = nic.connect(from: NodeID(UInt16(node)), protectionDomain: pd, simulator: simulator)
        simulator.spawn {
            if node == 2 { await simulator.sleep(nanoseconds: headStartNanoseconds) }
            do throws(FabricError) { _ = try await connection.compareAndSwap(region.address, expected: 0, desired: node, rkey: region.rkey) } catch {
                Issue.record("seed \(seed): node \(node)'s CAS failed: \(error)")
            }
        }
    }
    simulator.run()
    return nic.peekWord(region.address)
}

@Suite struct ScheduleExplorationTests {
    private static let explore = ScheduleExploration.randomPriorities(changePoints: 3)

    @Test func noneIsTheDefaultSchedule() throws {
        for seed: UInt64 in [7, 8] {
            let plain = try mixedVerbRun(Simulator(seed: seed))
            let none = try mixedVerbRun(Simulator(seed: seed, latency: LatencyModel(), exploration: .none))
            #expect(plain.hash == none.hash && plain.nanoseconds == none.nanoseconds, "seed \(seed): .none changed the run")
            let explored = try mixedVerbRun(Simulator(seed: seed, latency: LatencyModel(), exploration: Self.explore))
            #expect(explored.hash != plain.hash, "seed \(seed): exploration gave the plain run")
        }
    }

    @Test func sameSeedSameExploredRun() throws {
        let first = try mixedVerbRun(Simulator(seed: 11, latency: LatencyModel(), exploration: Self.explore))
        let again = try mixedVerbRun(Simulator(seed: 11, latency: LatencyModel(), exploration: Self.explore))
        let other = try mixedVerbRun(Simulator(seed: 12, latency: LatencyModel(), exploration: Self.explore))
        #expect(first.hash == again.hash && first.nanoseconds == again.nanoseconds, "seed 11 with exploration did not reproduce")
        #expect(first.hash != other.hash, "seeds 11 and 12 with exploration gave the same trace \(first.hash)")
    }

    @Test func sameSeedSameExploredWorkload() {
        var configuration = SimulatedWorkload.Configuration()
        configuration.computeNodes = 4
        configuration.tasksPerComputeNode = 4
        configuration.operationsPerTask = 20
        configuration.exploration = Self.explore
        let first = SimulatedWorkload(configuration).run(seed: 5)
        let again = SimulatedWorkload(configuration).run(seed: 5)
        #expect(first.violations.isEmpty, "seed 5 with exploration: \(first.violations.prefix(5))")
        #expect(first.traceHash == again.traceHash && first.virtualNanoseconds == again.virtualNanoseconds, "seed 5 with exploration did not reproduce")
        configuration.exploration = .none
        #expect(SimulatedWorkload(configuration).run(seed: 5).traceHash != first.traceHash, "seed 5: exploration changed nothing")
    }

    /// Node 2 starts 1 us after node 1: more than the jitter can make up, so without
    /// exploration node 1 always wins; with it, each node wins in some seeds.
    @Test func explorationRunsBothOrdersOfATwoNodeRace() throws {
        var winners: [UInt64: [UInt64]] = [:]
        for seed in sweepSeeds {
            let plain = try casRace(seed: seed, exploration: .none)
            #expect(plain == 1, "seed \(seed): without exploration node \(plain) won a race node 1 starts 1 us earlier")
            winners[try casRace(seed: seed, exploration: Self.explore), default: []].append(seed)
        }
        #expect(Set(winners.keys) == [1, 2], "seeds \(sweepSeeds.first!)...\(sweepSeeds.last!) with exploration: winners \(winners.mapValues(\.count))")
    }

    @Test func readyJobsRunInASeededOrder() {
        func order(seed: UInt64, _ exploration: ScheduleExploration) -> [Int] {
            let simulator = Simulator(seed: seed, latency: LatencyModel(), exploration: exploration)
            let order = Locked<[Int]>([])
            for index in 0..<6 { simulator.spawn { order.withLock { $0.append(index) } } }
            simulator.run()
            return order.withLock { $0 }
        }
        var shuffled: [UInt64] = []
        for seed in sweepSeeds {
            #expect(order(seed: seed, .none) == Array(0..<6), "seed \(seed): without exploration jobs must run first in, first out")
            let explored = order(seed: seed, Self.explore)
            #expect(explored.sorted() == Array(0..<6) && explored == order(seed: seed, Self.explore), "seed \(seed): \(explored)")
            if explored != Array(0..<6) { shuffled.append(seed) }
        }
        #expect(!shuffled.isEmpty, "seeds \(sweepSeeds.first!)...\(sweepSeeds.last!): exploration never changed the order of ready jobs")
    }

    @Test func aChangePointDropsTheNodeBelowEveryOther() {
        for seed in sweepSeeds {
            var explorer = PriorityExplorer(seed: seed, changePoints: 1, horizonVerbs: 1, spreadNanoseconds: 6_800)
            let dropped = NodeID(1)
            let others = (2...5 as ClosedRange<UInt16>).map { NodeID($0) }
            _ = explorer.priority(of: dropped)
            explorer.verbExecuted(count: 1, by: dropped)
            for other in others {
                #expect(explorer.priority(of: dropped) < explorer.priority(of: other), "seed \(seed)")
                #expect(explorer.rank(of: dropped) > explorer.rank(of: other), "seed \(seed)")
                #expect(explorer.delay(of: dropped) > explorer.delay(of: other), "seed \(seed): the dropped node must cross later")
            }
        }
    }
}

/// A queue pair's completions come in posting order: a small batch posted after a large
/// READ finishes first at the NIC, but its completion waits for the READ's, whose payload
/// crosses back first. (The completion used to be scheduled from its own finish alone when
/// the READ's was scheduled in an earlier turn, and came back first.)
@Suite struct CompletionOrderTests {
    @Test func aSmallBatchAfterALargeReadCompletesAfterIt() throws {
        let seed: UInt64 = 3
        let simulator = Simulator(seed: seed, latency: exactLatency())
        let (nic, pd, region) = try makeTarget(node: 0, regionBytes: 64 << 10)
        let connection = nic.connect(from: NodeID(1), protectionDomain: pd, simulator: simulator)
        let completions = Locked<[(String, UInt64)]>([])
        simulator.spawn {
            await recordingErrors("seed \(seed): the READ") {
                _ = try await connection.read(region.address, length: 64 << 10, rkey: region.rkey)
                completions.withLock { $0.append(("read", simulator.nowNanoseconds)) }
            }
        }
        simulator.spawn {
            await recordingErrors("seed \(seed): the CAS") {
                _ = try await connection.compareAndSwap(region.address, expected: 0, desired: 1, rkey: region.rkey)
                completions.withLock { $0.append(("cas", simulator.nowNanoseconds)) }
            }
        }
        simulator.run()
        let order = completions.withLock { $0 }
        #expect(order.map(\.0) == ["read", "cas"], "seed \(seed): completions \(order)")
        #expect(order.count == 2 && order[1].1 >= order[0].1, "seed \(seed): completions \(order)")
    }
}
