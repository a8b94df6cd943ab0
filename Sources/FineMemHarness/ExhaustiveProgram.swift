import FineMem

/// A tiny program for `ExhaustiveExploration`: compute nodes on one memory node of a small
/// pool, each running a short fixed list of operations at the same time as the others.
///
/// A run starts the cluster, performs `setup` one step at a time (after each, the cluster
/// is quiesced, so the setup has no choice point), then runs each compute node's list of
/// `concurrent` operations in a task of its own, all at once: these are the verbs whose
/// interleavings are enumerated. Then it quiesces, checks the pool at rest, frees every
/// block still held, one at a time, quiesces again and checks that every header is empty.
///
/// Blocks are named by handles: a compute node's `n`-th allocation (setup included,
/// counted from 0) is its handle `n`, whether or not it succeeded.
///
/// ```swift
/// let program = ExhaustiveProgram.named("small-pair-one-span")!
/// let report = ExhaustiveExploration().explore(program)
/// ```
package struct ExhaustiveProgram: Sendable, Hashable, CustomStringConvertible {
    /// One operation of a compute node.
    package enum Operation: Sendable, Hashable, CustomStringConvertible {
        /// Allocate `2^chunkCountLog2` chunks (4 KiB each); the next handle of the node.
        case allocate(chunkCountLog2: Int)
        /// Free the block of the node's handle `handle` (nothing when that allocation
        /// failed).
        case free(handle: Int)
        /// Read every header of every memory node into the node's cache (a warm cache, so
        /// the concurrent part starts from what the pool holds, not from the attach).
        case refreshCache

        package var description: String {
            switch self {
            case .allocate(let chunkCountLog2): "allocate \(ExhaustiveProgram.bytesText(chunkCountLog2: chunkCountLog2))"
            case .free(let handle): "free #\(handle)"
            case .refreshCache: "refresh the cache"
            }
        }
    }

    /// An operation of one compute node, run alone (see the type's summary).
    package struct SetupStep: Sendable, Hashable {
        package var computeNode: Int
        package var operation: Operation

        package init(_ computeNode: Int, _ operation: Operation) {
            self.computeNode = computeNode
            self.operation = operation
        }
    }

    /// The name `finemem explore --program` takes.
    package var name: String
    /// What the program races, in a few words.
    package var summary: String
    /// Data bytes of the memory node's pool (whole 2 MiB sections).
    package var poolBytes: UInt64
    /// Steps run one at a time before the concurrent part.
    package var setup: [SetupStep]
    /// The operations of each compute node in the concurrent part (index: compute node);
    /// there are as many compute nodes as lists.
    package var concurrent: [[Operation]]
    /// Whether an allocation of the concurrent part may answer `outOfMemory` (when the
    /// part frees nothing, such an answer is also checked against the pool afterwards).
    package var mayRunOutOfMemory: Bool

    package init(
        name: String, summary: String, poolBytes: UInt64, setup: [SetupStep] = [], concurrent: [[Operation]], mayRunOutOfMemory: Bool = false
    ) {
        self.name = name
        self.summary = summary
        self.poolBytes = poolBytes
        self.setup = setup
        self.concurrent = concurrent
        self.mayRunOutOfMemory = mayRunOutOfMemory
    }

    package var description: String {
        let setupText = setup.isEmpty ? "" : "setup: " + setup.map { "node \($0.computeNode) \($0.operation)" }.joined(separator: ", ") + "; "
        let nodes = concurrent.enumerated().map { node, operations in
            "node \(node): " + operations.map(\.description).joined(separator: ", ")
        }
        return "\(name) (\(summary); \(Self.bytesText(bytes: poolBytes)) pool): \(setupText)" + nodes.joined(separator: " | ")
    }

    /// "4 KiB", "128 KiB", "4 MiB" for a block of `2^chunkCountLog2` chunks.
    package static func bytesText(chunkCountLog2: Int) -> String {
        bytesText(bytes: PoolGeometry.chunkBytes << UInt64(max(0, min(chunkCountLog2, 40))))
    }

    /// A byte count in the largest binary unit that divides it.
    package static func bytesText(bytes: UInt64) -> String {
        for (suffix, unit) in [("GiB", UInt64(1) << 30), ("MiB", 1 << 20), ("KiB", 1 << 10)] where bytes >= unit && bytes % unit == 0 {
            return "\(bytes / unit) \(suffix)"
        }
        return "\(bytes) B"
    }

    // MARK: The named programs

    /// Two 4 KiB allocations on one span: node 0 opens span 0 in the setup (and keeps a
    /// block there), node 1 reads the headers; both then allocate 4 KiB from that span (a
    /// CAS race on its header, each commit with its record's READ, each flush after it).
    /// The smallest program: the tests explore it in full.
    package static let smallPairOneSpan = ExhaustiveProgram(
        name: "small-pair-one-span", summary: "two 4 KiB allocations on one span", poolBytes: 2 << 20,
        setup: [SetupStep(0, .allocate(chunkCountLog2: 0)), SetupStep(1, .refreshCache)],
        concurrent: [[.allocate(chunkCountLog2: 0)], [.allocate(chunkCountLog2: 0)]])

    /// Two 128 KiB allocations in one section: both nodes claim a span-sized block with
    /// one CAS on the only section header (from warm caches), then flush their logs.
    package static let sectionPair = ExhaustiveProgram(
        name: "section-pair", summary: "two 128 KiB allocations in one section", poolBytes: 2 << 20,
        setup: [SetupStep(0, .refreshCache), SetupStep(1, .refreshCache)],
        concurrent: [[.allocate(chunkCountLog2: 5)], [.allocate(chunkCountLog2: 5)]])

    /// Two 4 KiB allocations and frees on one span: as `smallPairOneSpan`, and each node
    /// frees its block again (a span that empties is closed by the flush of the free that
    /// emptied it, unless node 0's setup block keeps it open).
    package static let smallPairAllocateFree = ExhaustiveProgram(
        name: "small-pair-allocate-free", summary: "two 4 KiB allocations and frees on one span", poolBytes: 2 << 20,
        setup: [SetupStep(0, .allocate(chunkCountLog2: 0)), SetupStep(1, .refreshCache)],
        concurrent: [[.allocate(chunkCountLog2: 0), .free(handle: 1)], [.allocate(chunkCountLog2: 0), .free(handle: 0)]])

    /// A 128 KiB free racing a 4 KiB allocation in the same section: node 0 holds a
    /// section-layer block in the only section and frees it while node 1 opens a span
    /// there (its mark, the flip of the section entry, under the free's pending log).
    package static let sectionFreeVersusSmall = ExhaustiveProgram(
        name: "section-free-vs-small", summary: "a 128 KiB free racing a 4 KiB allocation in the same section", poolBytes: 2 << 20,
        setup: [SetupStep(0, .allocate(chunkCountLog2: 5)), SetupStep(1, .refreshCache)],
        concurrent: [[.free(handle: 0)], [.allocate(chunkCountLog2: 0)]])

    /// Two multi-section claims racing: both nodes claim 4 MiB (two whole sections) of a
    /// 4 MiB pool, each announced by an intent record; one gets it, the other must answer
    /// `outOfMemory` after rolling back whatever it claimed.
    package static let multiSectionPair = ExhaustiveProgram(
        name: "multi-section-pair", summary: "two multi-section claims racing for the whole pool", poolBytes: 4 << 20,
        concurrent: [[.allocate(chunkCountLog2: 10)], [.allocate(chunkCountLog2: 10)]], mayRunOutOfMemory: true)

    /// Two 4 KiB allocations on an empty pool: both nodes race to open span 0 (mark, flip
    /// of the section entry, first claim), and the loser finds another span or the
    /// winner's.
    package static let spanOpeningPair = ExhaustiveProgram(
        name: "span-opening-pair", summary: "two 4 KiB allocations opening spans of an empty section", poolBytes: 2 << 20,
        concurrent: [[.allocate(chunkCountLog2: 0)], [.allocate(chunkCountLog2: 0)]])

    /// Three operations on each node, from a warm cache: 4 KiB, 128 KiB, free the 4 KiB
    /// block, on a 4 MiB pool (bigger than the others: it may hit the run bound).
    package static let threeOperationPair = ExhaustiveProgram(
        name: "three-operation-pair", summary: "4 KiB, 128 KiB, free the first, on each node", poolBytes: 4 << 20,
        setup: [SetupStep(0, .refreshCache), SetupStep(1, .refreshCache)],
        concurrent: [
            [.allocate(chunkCountLog2: 0), .allocate(chunkCountLog2: 5), .free(handle: 0)],
            [.allocate(chunkCountLog2: 0), .allocate(chunkCountLog2: 5), .free(handle: 0)],
        ])

    /// Every named program, smallest first.
    package static let catalog: [ExhaustiveProgram] = [
        sectionPair, smallPairOneSpan, sectionFreeVersusSmall, spanOpeningPair, multiSectionPair, smallPairAllocateFree, threeOperationPair,
    ]

    // MARK: Room summary races

    /// Two 2 MiB frees in one summary word: each node frees the section it holds (full to
    /// room), so their syncs race on the same summary word and top word, different bits.
    package static let summaryFreePair = ExhaustiveProgram(
        name: "summary-free-pair", summary: "two 2 MiB frees racing their room summary syncs on one word", poolBytes: 4 << 20,
        setup: [SetupStep(0, .allocate(chunkCountLog2: 9)), SetupStep(1, .allocate(chunkCountLog2: 9))],
        concurrent: [[.free(handle: 0)], [.free(handle: 0)]])

    /// A 2 MiB free racing a 2 MiB allocation of the only section: the free's sync (room)
    /// and the claim's (full) race on the same bit, the header changing between a sync's
    /// read and its CAS; node 1's warm cache shows no room, so it looks through the
    /// summary first.
    package static let summaryFreeVersusClaim = ExhaustiveProgram(
        name: "summary-free-vs-claim", summary: "a 2 MiB free racing a 2 MiB claim of the only section", poolBytes: 2 << 20,
        setup: [SetupStep(0, .allocate(chunkCountLog2: 9)), SetupStep(1, .refreshCache)],
        concurrent: [[.free(handle: 0)], [.allocate(chunkCountLog2: 9)]], mayRunOutOfMemory: true)

    /// A 4 MiB free (a range sync over two sections) racing a 2 MiB free in a partial
    /// summary word (3 sections).
    package static let summaryRangeVersusSingle = ExhaustiveProgram(
        name: "summary-range-vs-single", summary: "a 4 MiB free and a 2 MiB free syncing one partial word", poolBytes: 6 << 20,
        setup: [SetupStep(0, .allocate(chunkCountLog2: 10)), SetupStep(1, .allocate(chunkCountLog2: 9))],
        concurrent: [[.free(handle: 0)], [.free(handle: 0)]])

    /// Room flipping twice on one section while another node frees there: node 0 frees
    /// its 1 MiB and claims 1 MiB again, node 1 frees its 1 MiB (the section goes full,
    /// room, maybe full again), each change synced by its node.
    package static let summaryFlip = ExhaustiveProgram(
        name: "summary-flip", summary: "room of one section flipping under two nodes' syncs", poolBytes: 2 << 20,
        setup: [SetupStep(0, .allocate(chunkCountLog2: 8)), SetupStep(1, .allocate(chunkCountLog2: 8))],
        concurrent: [[.free(handle: 0), .allocate(chunkCountLog2: 8)], [.free(handle: 0)]], mayRunOutOfMemory: true)

    /// The room summary races (not in `catalog`: `named` finds them).
    package static let summaryPrograms: [ExhaustiveProgram] = [summaryFreePair, summaryFreeVersusClaim, summaryRangeVersusSingle, summaryFlip]

    /// The named program called `name`, if any.
    package static func named(_ name: String) -> ExhaustiveProgram? { (catalog + summaryPrograms).first { $0.name == name } }
}
