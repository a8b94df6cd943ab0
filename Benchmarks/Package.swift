// swift-tools-version: 6.1
// The benchmarks of FineMem, a package of their own so that depending on FineMem does not
// pull in the benchmark harness: `cd Benchmarks && swift package benchmark`.
import PackageDescription

let package = Package(
    name: "FineMemBenchmarks",
    platforms: [.macOS(.v15)],
    dependencies: [
        .package(name: "FineMem", path: ".."),
        .package(url: "https://github.com/ordo-one/benchmark.git", from: "1.38.1", traits: ["MallocInterposer"]),
    ],
    targets: [
        .executableTarget(
            name: "FineMemBenchmarks",
            dependencies: [
                .product(name: "FineMem", package: "FineMem"),
                .product(name: "Benchmark", package: "benchmark"),
            ],
            path: "Benchmarks/FineMemBenchmarks",
            plugins: [.plugin(name: "BenchmarkPlugin", package: "benchmark")]
        ),
    ],
    swiftLanguageModes: [.v6]
)
