import FineMem
import FineMemHarness

/// Runs the allocator on a program the fuzzer wrote, in virtual time, and traps on any
/// broken invariant (a finding). See `allocatorFindings` for the program's form.
package func fuzzAllocator(_ bytes: [UInt8]) {
    if let finding = allocatorFindings(bytes).first {
        fatalError("allocator fuzz finding: \(finding)")
    }
}

/// Runs the allocator on a program and answers the invariant violations it found. The
/// first 8 bytes seed the simulation (and choose its schedule exploration and the cache
/// shards: 1, or 4 with a queue pair each, `FuzzShape`); then each step takes 2 bytes, an
/// operation and its argument:
///
/// - allocate (2^(argument % 12) chunks: 4 KiB-8 MiB) on compute node `op % 3`, for
///   application `op / 18 % 4 + 1` (its home shard and lane);
/// - free the held block chosen by the argument;
/// - a burst: `argument % 8 + 2` allocations at once from all three nodes, of
///   applications 1-4 (on their lanes);
/// - stall a compute node for a while;
/// - free a block as the wrong application or from the wrong node (must be refused and
///   change nothing).
///
/// After at most 96 steps every block is freed and every invariant checked at rest.
package func allocatorFindings(_ bytes: [UInt8]) -> [String] {
    simulateProgram(bytes) { input, simulator, failures, shape in await runProgram(&input, simulator: simulator, failures: failures, shape: shape) }
}

/// Violations found by one run (the simulation is single-threaded).
final class Failures: @unchecked Sendable {
    private(set) var all: [String] = []
    var first: String? { all.first }
    func add(_ problems: [String]) { all += problems }
}

/// The held blocks of a run, shared by the program and its bursts, and the application
/// that allocated each.
final class Holdings: @unchecked Sendable {
    var blocks: [(block: Block, node: Int)] = []
    private var applications: [Block: ApplicationID] = [:]

    /// Adds a block `application` of `node` was just given.
    func append(_ block: Block, node: Int, application: ApplicationID) {
        blocks.append((block, node))
        applications[block] = application
    }

    /// The application that holds `block` (a held one).
    func application(of block: Block) -> ApplicationID { applications[block] ?? ApplicationID(1) }
}

private func runProgram(_ input: inout FuzzInput, simulator: Simulator, failures: Failures, shape: FuzzShape) async {
    let cluster: EmbeddedCluster
    do {
        cluster = try await EmbeddedCluster.start(shape.configuration(memoryNodes: 2, poolBytesPerNode: 16 << 20, computeNodes: 3), simulator: simulator)
    } catch {
        failures.add(["cluster did not start: \(error)"])
        return
    }
    failures.add(shape.check(cluster))
    let inspector = PoolInspector(cluster: cluster)
    let holdings = Holdings()

    @Sendable func allocate(node: Int, chunkCountLog2: Int, application: ApplicationID) async {
        let blocks = cluster.computeNodes[node]
        do throws(AllocationError) {
            let block = try await blocks.allocate(chunkCountLog2: chunkCountLog2, application: application)
            failures.add(inspector.admit(block, owner: blocks.owner) + inspector.checkStructure())
            holdings.append(block, node: node, application: application)
        } catch {
            if case .outOfMemory = error { return }
            failures.add(["allocate 2^\(chunkCountLog2) chunks on node \(node): \(error)"])
        }
    }

    func free(at index: Int) async {
        let (block, node) = holdings.blocks.remove(at: index)
        failures.add(inspector.release(block))
        do throws(AllocationError) {
            try await cluster.computeNodes[node].free(block, application: holdings.application(of: block))
        } catch {
            failures.add(["free \(block): \(error)"])
        }
    }

    var steps = 0
    while !input.isAtEnd, steps < 96 {
        steps += 1
        let op = input.byte()
        let argument = Int(input.byte())
        let node = Int(op % 3)
        switch op / 3 % 6 {
        case 0, 1:
            await allocate(node: node, chunkCountLog2: argument % 12, application: ApplicationID(UInt16(op / 18 % 4 + 1)))
        case 2:
            if !holdings.blocks.isEmpty { await free(at: argument % holdings.blocks.count) }
        case 3:
            await withTaskGroup(of: Void.self) { group in
                for i in 0..<(argument % 8 + 2) {
                    group.addTask { await allocate(node: (node + i) % 3, chunkCountLog2: (argument + i) % 6, application: ApplicationID(UInt16(i % 4 + 1))) }
                }
            }
        case 4:
            simulator.faults.stall(EmbeddedCluster.computeNodeID(node), fromNanoseconds: simulator.nowNanoseconds, forNanoseconds: UInt64(argument) * 1_000)
        default:
            guard !holdings.blocks.isEmpty else { continue }
            let (block, owner) = holdings.blocks[argument % holdings.blocks.count]
            let application = holdings.application(of: block)
            let wrong = argument % 2 == 0 ? ApplicationID(application.rawValue % 4 + 1) : application
            let stranger = (owner + 1) % 3
            do throws(AllocationError) {
                try await cluster.computeNodes[argument % 2 == 0 ? owner : stranger].free(block, application: wrong)
                failures.add(["a free of \(block) by the wrong owner succeeded"])
            } catch {
                if case .notOwner = error {} else { failures.add(["a wrong-owner free of \(block) failed with \(error)"]) }
            }
        }
    }
    while !holdings.blocks.isEmpty { await free(at: holdings.blocks.count - 1) }
    await cluster.quiesce()
    failures.add(inspector.checkAtRest() + inspector.everyHeaderEmpty())
}
