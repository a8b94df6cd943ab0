import FineMem
import FineMemHarness

/// Runs the write-ahead log's flushes against stalls a fuzzer placed, and traps on any
/// broken invariant. See `flushFindings` for the program's form.
package func fuzzFlush(_ bytes: [UInt8]) {
    if let finding = flushFindings(bytes).first {
        fatalError("flush fuzz finding: \(finding)")
    }
}

/// Runs a program of operations whose flushes come late, and answers the violations found.
/// The first 8 bytes seed the simulation (top byte: schedule exploration and cache shards,
/// `FuzzShape`); then each step takes 2 bytes, an operation and its argument, on compute
/// node `op % 3` of one memory node with a small pool (so headers are shared and logs
/// collide; 32 MiB with 4 shards):
///
/// - allocate or free with the node stalled `argument` x 100 ns after the operation
///   starts: between its commit and its flush, or inside the flush's doorbell, or during
///   a span open or close, by the argument;
/// - a burst: every node allocates and frees small blocks on the same spans at once, so
///   commits fold other logs' flushes and wait on pending ones (applications 1-4: on
///   their lanes with 4 shards);
/// - fence and recover a node in the middle of a stall (its late flush must be discarded);
///   it restarts as a new incarnation at its next operation;
/// - free held blocks of a node in one burst (flushes folded into the next commit on
///   the same header).
///
/// After every step the structure and intents are checked; at the end everything is freed
/// and the pool must be at rest and empty, every record agreeing with the bitmaps.
package func flushFindings(_ bytes: [UInt8]) -> [String] {
    simulateProgram(bytes) { input, simulator, failures, shape in await runFlushProgram(&input, simulator: simulator, failures: failures, shape: shape) }
}

/// Nodes fenced in a flush program, and each node's incarnation (the simulation is
/// single-threaded).
private final class FencedNodes: @unchecked Sendable {
    var nodes: Set<Int> = []
    var incarnation = [0, 0, 0]
}

private func runFlushProgram(_ input: inout FuzzInput, simulator: Simulator, failures: Failures, shape: FuzzShape) async {
    let cluster: EmbeddedCluster
    do {
        cluster = try await EmbeddedCluster.start(shape.configuration(memoryNodes: 1, poolBytesPerNode: 8 << 20, computeNodes: 3), simulator: simulator)
    } catch {
        failures.add(["cluster did not start: \(error)"])
        return
    }
    failures.add(shape.check(cluster))
    let inspector = PoolInspector(cluster: cluster)
    let holdings = Holdings()
    let fenced = FencedNodes()

    // A node fenced while its operation was stalled may still see the operation's answer
    // when it resumes: what it then holds is nobody's (recovery took it back), and its
    // errors are expected. Only operations of the incarnation that started them count.
    @Sendable func allocate(node: Int, chunkCountLog2: Int, application: ApplicationID = ApplicationID(1)) async {
        let blocks = cluster.computeNodes[node]
        let incarnation = fenced.incarnation[node]
        do throws(AllocationError) {
            let block = try await blocks.allocate(chunkCountLog2: chunkCountLog2, application: application)
            guard fenced.incarnation[node] == incarnation else { return }
            failures.add(inspector.admit(block, owner: blocks.owner))
            holdings.append(block, node: node, application: application)
        } catch {
            if case .outOfMemory = error { return }
            if fenced.incarnation[node] == incarnation { failures.add(["allocate 2^\(chunkCountLog2) chunks on node \(node): \(error)"]) }
        }
    }

    @Sendable func free(_ block: Block, node: Int) async {
        failures.add(inspector.release(block))
        let incarnation = fenced.incarnation[node]
        do throws(AllocationError) { try await cluster.computeNodes[node].free(block, application: holdings.application(of: block)) } catch {
            if fenced.incarnation[node] == incarnation { failures.add(["free \(block): \(error)"]) }
        }
    }

    func take(of node: Int, _ argument: Int) -> Block? {
        let candidates = holdings.blocks.indices.filter { holdings.blocks[$0].node == node }
        guard !candidates.isEmpty else { return nil }
        return holdings.blocks.remove(at: candidates[argument % candidates.count]).block
    }

    func restartIfFenced(_ node: Int) async {
        guard fenced.nodes.contains(node) else { return }
        do {
            _ = try await cluster.recover(computeNode: node)
            _ = try await cluster.restart(computeNode: node)
        } catch {
            failures.add(["restart of node \(node): \(error)"])
            return
        }
        fenced.nodes.remove(node)
    }

    var steps = 0
    while !input.isAtEnd, steps < 80 {
        steps += 1
        let op = input.byte()
        let argument = Int(input.byte())
        let node = Int(op % 3)
        let id = EmbeddedCluster.computeNodeID(node)
        switch op / 3 % 5 {
        case 0, 1:
            await restartIfFenced(node)
            simulator.faults.stall(id, fromNanoseconds: simulator.nowNanoseconds + UInt64(argument % 64) * 100, forNanoseconds: UInt64(argument) * 2_000)
            if op / 3 % 5 == 0 || holdings.blocks.allSatisfy({ $0.node != node }) {
                simulator.spawn { await allocate(node: node, chunkCountLog2: argument % 7) }
            } else if let block = take(of: node, argument) {
                simulator.spawn { await free(block, node: node) }
            }
            await simulator.sleep(nanoseconds: UInt64(argument % 16) * 1_000)
        case 2:
            await withTaskGroup(of: Void.self) { group in
                for i in 0..<(argument % 6 + 3) where !fenced.nodes.contains((node + i) % 3) {
                    group.addTask { await allocate(node: (node + i) % 3, chunkCountLog2: (argument >> i) % 3, application: ApplicationID(UInt16(i % 4 + 1))) }
                }
            }
        case 3:
            guard !fenced.nodes.contains(node) else { continue }
            // Fence the node in the middle of a stall: whatever it flushes late is dropped.
            simulator.faults.stall(id, fromNanoseconds: simulator.nowNanoseconds, forNanoseconds: 200_000)
            if let block = take(of: node, argument) { simulator.spawn { await free(block, node: node) } }
            await simulator.sleep(nanoseconds: UInt64(argument % 32) * 500)
            fenced.nodes.insert(node)
            fenced.incarnation[node] += 1
            // From the fence on, its blocks are recovery's: others may get them at once.
            for (block, holder) in holdings.blocks where holder == node { failures.add(inspector.release(block)) }
            holdings.blocks.removeAll { $0.node == node }
            do {
                try await cluster.fence(computeNode: node)
                _ = try await cluster.recover(computeNode: node)
            } catch {
                failures.add(["fence and recovery of node \(node): \(error)"])
            }
        default:
            await restartIfFenced(node)
            var blocks: [Block] = []
            while blocks.count < argument % 5 + 1, let block = take(of: node, argument + blocks.count) { blocks.append(block) }
            await withTaskGroup(of: Void.self) { group in
                for block in blocks { group.addTask { await free(block, node: node) } }
            }
        }
        failures.add(inspector.checkStructure() + inspector.checkIntents())
    }
    await simulator.sleep(nanoseconds: 1_000_000)
    for node in 0..<3 { await restartIfFenced(node) }
    while let (block, node) = holdings.blocks.popLast() { await free(block, node: node) }
    await cluster.quiesce()
    failures.add(inspector.checkAtRest() + inspector.everyHeaderEmpty())
}
