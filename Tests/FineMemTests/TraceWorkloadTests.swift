import Testing
@testable import FineMem
import FineMemHarness

/// The allocator-shaped replays (`TraceWorkload`): each shape draws the sizes its
/// allocator asks for, runs clean with room, and runs out of memory (every such answer
/// confirmed against the full pool) when the pool is half of its demand.
@Suite struct TraceWorkloadTests {
    /// tcmalloc all 2 MiB; jemalloc and ptmalloc mostly 4 KiB; mimalloc's median 64 KiB.
    @Test func theShapesDrawTheirAllocatorsSizes() {
        for shape in TraceWorkload.Shape.allCases {
            var random = SeededRandom(seed: 7)
            let sizes = (0..<10_000).map { _ in shape.drawSize(&random) }.sorted()
            let (median, share4KiB) = (sizes[sizes.count / 2], Double(sizes.count { $0 == 0 }) / Double(sizes.count))
            switch shape {
            case .tcmalloc: #expect(sizes.allSatisfy { $0 == 9 }, "tcmalloc: \(Set(sizes))")
            case .jemalloc, .ptmalloc: #expect(median == 0 && share4KiB > 0.7, "\(shape): median 2^\(median) chunks, \(share4KiB) of 4 KiB")
            case .mimalloc: #expect(median == 4, "mimalloc: median 2^\(median) chunks")
            }
            #expect(shape.sizes.reduce(0) { $0 + $1.percent } == 100, "\(shape): weights")
        }
    }

    /// Every shape with room (200 % of its demand) and to exhaustion (50 %), 2 compute
    /// nodes x 4 tasks x 40 requests, seed 1 (rerun one with `swift run -c release finemem
    /// soak --workload trace --shape SHAPE --pool-percent P --compute-nodes 2 --tasks 4
    /// --seeds 1`): no violation and no answer other than a block or `outOfMemory`; with
    /// room no `outOfMemory`, to exhaustion some; every block freed at the end; tcmalloc's
    /// room summary syncs joined.
    @Test(arguments: TraceWorkload.Shape.allCases)
    func replaysRunCleanWithRoomAndToExhaustion(shape: TraceWorkload.Shape) {
        for percent in [200, 50] {
            var configuration = TraceWorkload.Configuration()
            configuration.shape = shape
            configuration.computeNodes = 2
            configuration.tasksPerComputeNode = 4
            configuration.requestsPerTask = 40
            configuration.poolPercentOfDemand = percent
            configuration.checkStructureEachOperation = true
            let report = TraceWorkload(configuration).run(seed: 1)
            let context = "\(shape) at \(percent) % of demand, seed 1: \(report)"
            #expect(report.violations.isEmpty && report.wrongAnswers.isEmpty, "\(context): \((report.wrongAnswers + report.violations).prefix(3))")
            #expect(report.allocations + report.outOfMemory == 2 * 4 * 40, "\(context): answers")
            #expect(report.frees == report.allocations, "\(context): frees")
            #expect(report.statistics.outOfMemoryAnswers == UInt64(report.outOfMemory), "\(context): statistics")
            if percent > 100 { #expect(report.outOfMemory == 0, "\(context)") } else { #expect(report.outOfMemory > 0, "\(context)") }
            if shape == .tcmalloc, percent > 100 {
                // Every 2 MiB allocation and free changes its section's room: the syncs
                // of one word joined (fewer syncs than operations), and the summary agreed
                // at rest all the same (checked among the violations).
                let operations = report.statistics.allocations + report.statistics.frees
                #expect(report.statistics.summarySyncs < operations / 2, "\(context): \(report.statistics.summarySyncs) syncs for \(operations) operations")
            }
        }
    }
}
