import FineMem
import FineMemHarness

/// Runs crashes, stalls, fences and recoveries at points a fuzzer chose, and traps on any
/// broken invariant. See `recoveryFindings` for the program's form.
package func fuzzRecovery(_ bytes: [UInt8]) {
    if let finding = recoveryFindings(bytes).first {
        fatalError("recovery fuzz finding: \(finding)")
    }
}

/// Runs a crash-and-recovery program and answers the invariant violations it found. The
/// first 8 bytes seed the simulation (its top byte picks the schedule exploration and the
/// cache shards, as in `allocatorFindings`); then each step takes 2 bytes, an operation
/// and its argument, on compute node `op % 3` of two memory nodes:
///
/// - allocate 2^(argument % 12) chunks;
/// - free a held block;
/// - crash the node after `argument % 24` more of its verbs (its unexecuted verbs dropped,
///   run late, or a seeded mix, by `argument / 24 % 3`), then give it an operation to run;
/// - fence and recover the node (crashed or not): through the memory nodes' loopback, or a
///   live node's connection, or first through a recoverer that crashes after
///   `argument / 4 % 48` of its verbs and then again through the loopback;
/// - restart a recovered node as a new incarnation;
/// - stall the node for `argument` microseconds;
/// - a burst of small allocations from every live node, of applications 1-4 (on their
///   lanes when there are 4 shards).
///
/// The structural invariants and intents are checked after every step. At the end every
/// node not yet recovered is fenced and recovered, everyone frees, and the pool must be at
/// rest and empty.
package func recoveryFindings(_ bytes: [UInt8]) -> [String] {
    simulateProgram(bytes) { input, simulator, failures, shape in await runRecoveryProgram(&input, simulator: simulator, failures: failures, shape: shape) }
}

/// The state of one compute node in a recovery program.
private enum NodeState {
    case live
    /// A crash is planned (it may not have come yet).
    case doomed
    /// Fenced; its recovery has not finished (it waited on another dead node's log).
    case fenced
    case recovered
}

private final class Nodes: @unchecked Sendable {
    var state: [NodeState] = [.live, .live, .live]
    var recoverers: UInt16 = 0
    /// Whether a node that crashed or was fenced is not recovered yet (its pending logs may
    /// hold headers: others wait on them, its recovery may wait on another's).
    var someoneDead: Bool { state.contains(.doomed) || state.contains(.fenced) }
}

/// Whether `error` is a recovery that gave up waiting on headers held by other nodes' logs.
private func isNotSettled(_ error: any Error) -> Bool {
    if let error = error as? RecoveryError, case .notSettled = error { return true }
    if let error = error as? MemoryNodeError, case .recovery(.notSettled) = error { return true }
    return false
}

private func runRecoveryProgram(_ input: inout FuzzInput, simulator: Simulator, failures: Failures, shape: FuzzShape) async {
    let cluster: EmbeddedCluster
    do {
        cluster = try await EmbeddedCluster.start(shape.configuration(memoryNodes: 2, poolBytesPerNode: 16 << 20, computeNodes: 3), simulator: simulator)
    } catch {
        failures.add(["cluster did not start: \(error)"])
        return
    }
    failures.add(shape.check(cluster))
    let inspector = PoolInspector(cluster: cluster)
    let application = ApplicationID(1)
    let holdings = Holdings()
    let nodes = Nodes()

    @Sendable func allocate(node: Int, chunkCountLog2: Int, application: ApplicationID = ApplicationID(1)) async {
        let blocks = cluster.computeNodes[node]
        do throws(AllocationError) {
            let block = try await blocks.allocate(chunkCountLog2: chunkCountLog2, application: application)
            failures.add(inspector.admit(block, owner: blocks.owner))
            holdings.append(block, node: node, application: application)
        } catch {
            if case .outOfMemory = error { return }
            if case .retryLimitExceeded = error, nodes.someoneDead { return }  // waited on a dead node's log
            if nodes.state[node] == .live { failures.add(["allocate 2^\(chunkCountLog2) chunks on live node \(node): \(error)"]) }
        }
    }

    func recover(_ node: Int, how: Int) async {
        // From the fence on, its blocks are recovery's: others may get them at once.
        for (block, holder) in holdings.blocks where holder == node { failures.add(inspector.release(block)) }
        holdings.blocks.removeAll { $0.node == node }
        do {
            try await cluster.fence(computeNode: node)
        } catch {
            failures.add(["fence of node \(node): \(error)"])
            return
        }
        nodes.state[node] = .fenced
        let owner = EmbeddedCluster.owner(ofComputeNode: node)
        if how % 4 >= 2 {
            // A recoverer that crashes part-way; the next recovery finishes its job.
            nodes.recoverers += 1
            let recoverer = NodeID(900 + nodes.recoverers)
            simulator.faults.crash(recoverer, afterVerbs: UInt64(how / 4 % 48), late: .all)
            var accesses: [(MemoryNode, RecoveryAccess)] = []
            for memoryNode in cluster.memoryNodes {
                guard let access = try? memoryNode.recoveryAccess(for: owner, from: recoverer) else {
                    failures.add(["no recovery access on \(memoryNode.id)"])
                    return
                }
                accesses.append((memoryNode, access))
                _ = try? await PoolRecovery(access: access, runtime: simulator).run()
            }
            await simulator.sleep(nanoseconds: 20_000)
            // The crashed recoverer is fenced: its late verbs stop here.
            for (memoryNode, access) in accesses {
                do { try memoryNode.revoke(access) } catch { failures.add(["revoking the recoverer on \(memoryNode.id): \(error)"]) }
            }
        }
        let helper = (0..<3).first { $0 != node && nodes.state[$0] == .live && !cluster.computeNodes[$0].isFenced }
        do {
            if how % 2 == 1, let helper {
                // A live compute node lends its CPU: the memory node grants it a
                // recoverer's access of its own (a new one fences any earlier recoverer).
                for memoryNode in cluster.memoryNodes {
                    let access = try memoryNode.recoveryAccess(for: owner, from: EmbeddedCluster.computeNodeID(helper))
                    _ = try await PoolRecovery(access: access, runtime: simulator).run()
                    try memoryNode.revoke(access)
                }
            }
            _ = try await cluster.recover(computeNode: node)
        } catch {
            // A recovery may wait on another dead node's pending log; it runs again later.
            let otherDead = nodes.state.enumerated().contains { $0.offset != node && ($0.element == .doomed || $0.element == .fenced) }
            if !(otherDead && isNotSettled(error)) { failures.add(["recovery of node \(node): \(error)"]) }
            return
        }
        nodes.state[node] = .recovered
        await cluster.quiesce()
        // At rest only when no dead node is left unrecovered (its logs stay pending).
        if !nodes.someoneDead { failures.add(inspector.checkAtRest()) }
    }

    var steps = 0
    while !input.isAtEnd, steps < 64 {
        steps += 1
        let op = input.byte()
        let argument = Int(input.byte())
        let node = Int(op % 3)
        let live = nodes.state[node] == .live
        switch op / 3 % 8 {
        case 0, 1:
            if live { await allocate(node: node, chunkCountLog2: argument % 12) }
        case 2:
            let candidates = holdings.blocks.indices.filter { nodes.state[holdings.blocks[$0].node] == .live }
            if !candidates.isEmpty {
                let (block, holder) = holdings.blocks.remove(at: candidates[argument % candidates.count])
                failures.add(inspector.release(block))
                do throws(AllocationError) { try await cluster.computeNodes[holder].free(block, application: holdings.application(of: block)) } catch {
                    if case .retryLimitExceeded = error, nodes.someoneDead {
                        // It waited on a dead node's pending log and changed nothing: still held.
                        failures.add(inspector.admit(block, owner: cluster.computeNodes[holder].owner))
                        holdings.blocks.append((block, holder))
                    } else {
                        failures.add(["free \(block): \(error)"])
                    }
                }
            }
        case 3:
            guard live else { continue }
            let late: FaultPlan.LateVerbs = [.none, .all, .seeded][argument / 24 % 3]
            let id = EmbeddedCluster.computeNodeID(node)
            simulator.faults.crash(id, afterVerbs: simulator.verbsExecuted(by: id) + UInt64(argument % 24), late: late)
            nodes.state[node] = .doomed
            // The doomed node's operation runs until the crash cuts it.
            // A free that answers took effect (its log may still be pending: the header is
            // then held until recovery); one cut by the crash leaves the block in the
            // ledger until recovery takes it back.
            if let index = holdings.blocks.firstIndex(where: { $0.node == node }), argument % 2 == 0 {
                let block = holdings.blocks[index].block
                if (try? await cluster.computeNodes[node].free(block, application: holdings.application(of: block))) != nil {
                    holdings.blocks.removeAll { $0.block == block }
                    failures.add(inspector.release(block))
                }
            } else if let block = try? await cluster.computeNodes[node].allocate(chunkCountLog2: argument % 11, application: application) {
                failures.add(inspector.admit(block, owner: cluster.computeNodes[node].owner))
                holdings.append(block, node: node, application: application)
            }
        case 4:
            if nodes.state[node] != .recovered { await recover(node, how: argument) }
        case 5:
            guard nodes.state[node] == .recovered else { continue }
            simulator.faults.revive(EmbeddedCluster.computeNodeID(node))
            do { _ = try await cluster.restart(computeNode: node) } catch {
                failures.add(["restart of node \(node): \(error)"])
                continue
            }
            nodes.state[node] = .live
        case 6:
            simulator.faults.stall(EmbeddedCluster.computeNodeID(node), fromNanoseconds: simulator.nowNanoseconds, forNanoseconds: UInt64(argument) * 1_000)
        default:
            await withTaskGroup(of: Void.self) { group in
                for i in 0..<(argument % 6 + 2) where nodes.state[(node + i) % 3] == .live {
                    group.addTask { await allocate(node: (node + i) % 3, chunkCountLog2: (argument + i) % 5, application: ApplicationID(UInt16(i % 4 + 1))) }
                }
            }
        }
        failures.add(inspector.checkStructure() + inspector.checkIntents())
    }
    for _ in 0..<3 {
        for node in 0..<3 where nodes.state[node] == .doomed || nodes.state[node] == .fenced { await recover(node, how: 0) }
    }
    for node in 0..<3 where nodes.state[node] != .live && nodes.state[node] != .recovered {
        failures.add(["node \(node) is still \(nodes.state[node]) after three rounds of recovery"])
    }
    for (block, holder) in holdings.blocks {
        failures.add(inspector.release(block))
        do throws(AllocationError) { try await cluster.computeNodes[holder].free(block, application: holdings.application(of: block)) } catch {
            failures.add(["final free \(block): \(error)"])
        }
    }
    await cluster.quiesce()
    failures.add(inspector.checkAtRest() + inspector.everyHeaderEmpty())
}
