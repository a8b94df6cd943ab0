import ArgumentParser
import FineMem
import FineMemHarness

@main
struct FineMemCommand: AsyncParsableCommand {
    static let configuration = CommandConfiguration(
        commandName: "finemem",
        abstract: "FineMem: fine-grained remote memory allocation over one-sided RDMA.",
        discussion: """
            Without RDMA hardware everything runs on an embedded, simulated memory node: \
            `demo` on real threads, `soak` and `bench` in deterministic virtual time.
            """,
        subcommands: [Demo.self, Soak.self, Bench.self, RecoveryBench.self, Explore.self, CrashPoints.self, Devices.self, HardwareSuiteCommand.self],
        defaultSubcommand: Demo.self
    )
}

/// Parses sizes like `4096`, `64KiB`, `2MiB`, `1GiB`.
struct ByteCount: ExpressibleByArgument, CustomStringConvertible {
    let bytes: UInt64

    init(bytes: UInt64) { self.bytes = bytes }

    init?(argument: String) {
        let units: [(String, UInt64)] = [("KiB", 1 << 10), ("MiB", 1 << 20), ("GiB", 1 << 30), ("TiB", 1 << 40), ("K", 1 << 10), ("M", 1 << 20), ("G", 1 << 30), ("B", 1)]
        var text = Substring(argument)
        var multiplier: UInt64 = 1
        for (suffix, value) in units where text.hasSuffix(suffix) {
            text = text.dropLast(suffix.count)
            multiplier = value
            break
        }
        guard let number = UInt64(text), number > 0 else { return nil }
        let (product, overflow) = number.multipliedReportingOverflow(by: multiplier)
        guard !overflow else { return nil }
        bytes = product
    }

    var description: String { Format.bytes(bytes) }
}

enum Format {
    static func bytes(_ value: UInt64) -> String {
        for (suffix, unit) in [("GiB", UInt64(1) << 30), ("MiB", 1 << 20), ("KiB", 1 << 10)] where value >= unit && value % unit == 0 {
            return "\(value / unit) \(suffix)"
        }
        return "\(value) B"
    }

    /// `value` with `digits` decimals (no exponent, however small or large).
    static func fixed(_ value: Double, _ digits: Int = 2) -> String {
        guard value.isFinite else { return "\(value)" }
        var scale: Int64 = 1
        for _ in 0..<digits { scale *= 10 }
        let scaled = (value * Double(scale)).rounded()
        guard abs(scaled) < 9e18 else { return "\(value)" }
        let units = Int64(scaled)
        let sign = units < 0 ? "-" : ""
        let whole = abs(units) / scale
        guard digits > 0 else { return "\(sign)\(whole)" }
        let fraction = String(abs(units) % scale)
        return "\(sign)\(whole)." + String(repeating: "0", count: digits - fraction.count) + fraction
    }

    /// A two-column table with aligned values.
    static func table(_ rows: [(String, String)]) -> String {
        let width = rows.map(\.0.count).max() ?? 0
        return rows.map { name, value in name + String(repeating: " ", count: width - name.count) + "  " + value }.joined(separator: "\n")
    }
}

struct Devices: ParsableCommand {
    static let configuration = CommandConfiguration(
        abstract: "List RDMA devices with their ports, GIDs, atomic and window capabilities (none here means: use the simulated NIC)."
    )

    @Option(help: "Fail unless a device of this name is listed (for CI on Soft-RoCE).") var expect: String?

    func run() throws {
        let devices = try VerbsDevices.list()
        if devices.isEmpty {
            print("no RDMA devices (the kernel reports none): FineMem runs on its simulated NIC")
        }
        for device in devices {
            do {
                for line in try VerbsDeviceReport(device).lines { print(line) }
            } catch {
                print("\(device.name)  guid 0x\(String(device.guid, radix: 16))  (cannot be queried: \(error))")
            }
        }
        if let expect, !devices.contains(where: { $0.name == expect }) {
            throw ValidationError("no RDMA device named \(expect)")
        }
    }
}
