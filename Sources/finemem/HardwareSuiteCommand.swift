import ArgumentParser
import FineMem
import FineMemHarness
#if canImport(Glibc)
import Glibc
#endif

struct HardwareSuiteCommand: AsyncParsableCommand {
    static let configuration = CommandConfiguration(
        commandName: "hardware-suite",
        abstract: "Run the verbs backend and the allocator against a real RDMA device (Soft-RoCE or a ConnectX card).",
        discussion: """
            Checks the queue pair state machine, every verb, batches, fences, every access \
            error and the error state, memory windows, the TCP bootstrap, and the allocator's \
            workloads with the pool's invariants, on the device given by --device or \
            FINEMEM_RDMA_DEVICE. Without either, it reports itself skipped and exits 0. \
            Exits 1 when a check fails.
            """
    )

    @Option(help: "The RDMA device (default: $FINEMEM_RDMA_DEVICE).") var device: String?

    func run() async throws {
        guard let device = device ?? ProcessEnvironment.value("FINEMEM_RDMA_DEVICE"), !device.isEmpty else {
            print("hardware suite: skipped (no device: set FINEMEM_RDMA_DEVICE or pass --device)")
            return
        }
        print("hardware suite on \(device)")
        let results = await HardwareSuite(device: device).run { check in
            switch check.outcome {
            case .passed(let detail): print("PASS  \(check.name)\n        \(detail)")
            case .failed(let reason): print("FAIL  \(check.name)\n        \(reason)")
            case .skipped(let reason): print("SKIP  \(check.name)\n        \(reason)")
            }
        }
        var passed = 0, failed = 0
        var skipped: [String] = []
        for check in results {
            switch check.outcome {
            case .passed: passed += 1
            case .failed: failed += 1
            case .skipped(let reason): skipped.append("\(check.name): \(reason)")
            }
        }
        print("\(passed) passed, \(failed) failed, \(skipped.count) skipped" + (skipped.isEmpty ? "" : " (\(skipped.joined(separator: "; ")))"))
        if failed > 0 { throw ExitCode(1) }
    }
}

enum ProcessEnvironment {
    static func value(_ name: String) -> String? {
        guard let raw = getenv(name) else { return nil }
        return String(cString: raw)
    }
}
