#if FUZZING
import CFuzzerDriver
#endif
#if canImport(Glibc)
import Glibc
#endif

/// The target the libFuzzer callback runs: a C function pointer cannot capture, so the
/// body is stored here once, before the driver starts, and only read afterwards.
nonisolated(unsafe) private var currentTarget: ([UInt8]) -> Void = { _ in }

/// The `main` of a fuzz executable. Built with `-DFUZZING` (and `-sanitize=fuzzer`), it
/// hands `target` to libFuzzer's driver with the command line; otherwise it replays the
/// input files named on the command line, so that a saved crash can be rerun in an
/// ordinary build. Never returns.
package func runFuzzer(name: String, _ target: @escaping ([UInt8]) -> Void) -> Never {
    currentTarget = target
    #if FUZZING
    var argc = CommandLine.argc
    var argv: UnsafeMutablePointer<UnsafeMutablePointer<CChar>?>? = CommandLine.unsafeArgv
    exit(LLVMFuzzerRunDriver(&argc, &argv) { data, size in
        currentTarget(Array(UnsafeBufferPointer(start: data, count: size)))
        return 0
    })
    #else
    let paths = CommandLine.arguments.dropFirst()
    if paths.isEmpty {
        print("usage: \(name) FILE... (replays inputs; build with -DFUZZING and -sanitize=fuzzer to fuzz)")
    }
    for path in paths {
        guard let file = fopen(path, "rb") else {
            print("cannot read \(path)")
            exit(1)
        }
        var bytes: [UInt8] = []
        var buffer = [UInt8](repeating: 0, count: 4096)
        while true {
            let count = fread(&buffer, 1, buffer.count, file)
            if count <= 0 { break }
            bytes += buffer[0..<count]
        }
        fclose(file)
        currentTarget(bytes)
        print("\(path): ok")
    }
    exit(0)
    #endif
}
