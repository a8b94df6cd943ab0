import ArgumentParser
import FineMem
import FineMemHarness

/// `finemem bench --traces`: the allocator-shaped replays, each shape with room and to
/// exhaustion, one line each.
extension Bench {
    /// The two pool sizes each shape runs in, as a percentage of its expected demand.
    static let traceConditions: [(label: String, poolPercentOfDemand: Int)] = [("room", 200), ("exhaustion", 50)]

    func runTraces() throws {
        print("trace replays: \(computeNodes) compute nodes x \(tasks) tasks, \(requests) requests each, every block held to the end; "
              + "\(memoryNodes) memory nodes sized from each shape's demand; seed \(seed); virtual time, default latency model")
        print("out-of-memory answers are confirmed against the full pool once every task has stopped; a run that is not fails the command")
        let header = ["shape", "pool", "allocs", "OOM", "lat avg", "lat p99", "RT avg", "RT p99", "RT max", "RT/alloc", "CAS avg", "CAS max", "OOM CAS max", "upkeep/op", "syncs/op", "verbs/op", "refreshes", "wall s"]
        var lines = [header]
        var failures: [String] = []
        for shape in shapes {
            for condition in Self.traceConditions {
                var configuration = TraceWorkload.Configuration()
                configuration.shape = shape
                configuration.memoryNodes = memoryNodes
                configuration.computeNodes = computeNodes
                configuration.tasksPerComputeNode = tasks
                configuration.requestsPerTask = requests
                configuration.poolPercentOfDemand = condition.poolPercentOfDemand
                configuration.allocator.contentionHigh = contentionHigh
                configuration.allocator.roomSummaryDelayNanos = roomSummaryDelay
                let clock = SystemRuntime.shared
                let started = clock.nowNanoseconds
                let report = TraceWorkload(configuration).run(seed: seed)
                let wall = Double(clock.nowNanoseconds - started) / 1e9
                failures += (report.wrongAnswers + report.violations).prefix(3).map { "\(shape.rawValue), \(condition.label): \($0)" }
                let s = report.statistics
                let latencies = report.answerLatencies.sorted()
                let average = latencies.isEmpty ? 0 : Double(latencies.reduce(0, +)) / Double(latencies.count)
                let p99 = latencies.isEmpty ? 0 : latencies[min(latencies.count - 1, latencies.count * 99 / 100)]
                let answers = s.allocations + s.outOfMemoryAnswers
                let pool = "\(condition.label) \(Format.bytes(configuration.poolBytesPerNode * UInt64(memoryNodes)))"
                lines.append([
                    shape.rawValue, pool, "\(s.allocations)", "\(s.outOfMemoryAnswers)",
                    Format.fixed(average / 1_000, 1), Format.fixed(Double(p99) / 1_000, 1),
                    Format.fixed(Double(s.allocationBatches + s.outOfMemoryBatches) / Double(max(1, answers)), 2),
                    "\(s.answerRoundTrips(percentile: 0.99))", "\(s.answerRoundTripsMax)",
                    Format.fixed(s.roundTripsPerAllocation, 3),
                    Format.fixed(s.casRetriesAverage, 3) + "/" + Format.fixed(Double(s.casRetriesOnPendingLog) / Double(max(1, s.allocations)), 3), "\(s.casRetriesMax)", "\(s.outOfMemoryRetriesMax)",
                    Format.fixed(Double(s.upkeepBatches) / Double(max(1, s.allocations + s.frees)), 3),
                    Format.fixed(Double(s.summarySyncs) / Double(max(1, s.allocations + s.frees)), 3),
                    Format.fixed(Double(s.upkeepVerbs) / Double(max(1, s.allocations + s.frees)), 2),
                    "\(s.refreshes)+\(s.summaryRefreshes)",
                    Format.fixed(wall, 1),
                ])
            }
        }
        let widths = header.indices.map { column in lines.map { $0[column].count }.max() ?? 0 }
        for line in lines {
            print(line.indices.map { line[$0] + String(repeating: " ", count: widths[$0] - line[$0].count) }.joined(separator: "  "))
        }
        print("lat: virtual us from call to answer (blocks and out of memory); RT: round trips before an answer; RT/alloc: per block handed out;")
        print("CAS: failed CASes per allocation (OOM CAS: per out-of-memory answer); upkeep/op: round trips after the answer per allocation or free;")
        print("syncs/op: room summary syncs per allocation or free; verbs/op: upkeep verbs per allocation or free;")
        print("refreshes: full + summary reads of the headers.")
        if !failures.isEmpty {
            for failure in failures { print("FAILED \(failure)") }
            throw ExitCode.failure
        }
    }
}

extension TraceWorkload.Shape: ExpressibleByArgument {}
