// swift-tools-version:6.0
import PackageDescription

let package = Package(
    name: "LoLDU",
    products: [
        // libloldu.so: the C ABI declared in include/loldu.h.
        .library(name: "loldu", type: .dynamic, targets: ["LoLDUCAPI"]),
        // The `loldu` command-line tool (installed as bin/loldu), the library linked in.
        .executable(name: "loldu-cli", targets: ["LoLDUCommand"]),
    ],
    targets: [
        // OpenBLAS (cblas) and LAPACKE, found through pkg-config.
        .systemLibrary(
            name: "CLinearAlgebra",
            pkgConfig: "openblas",
            providers: [.apt(["libopenblas-dev", "liblapacke-dev"])]
        ),
        // include/loldu.h as a Clang module, for the thunks' types and for the tests.
        .systemLibrary(name: "CLoLDU"),
        // oneDNN's header, for its types: the library itself is loaded with dlopen (OneDNN.swift).
        .systemLibrary(name: "CDNNL", providers: [.apt(["libdnnl-dev"])]),
        // The Swift core: factorisation, adapter, kernels, optimisers, checkpoints.
        .target(name: "LoLDU", dependencies: ["CLinearAlgebra", "CLoLDU", "CDNNL"]),
        // The @_cdecl thunks: validation and error mapping only.
        .target(name: "LoLDUCAPI", dependencies: ["LoLDU", "CLoLDU"], exclude: ["exports.map"]),
        // The command-line tool: inspect, verify, export-lora, merge.
        .executableTarget(name: "LoLDUCommand", dependencies: ["LoLDU", "LoLDUCAPI", "CLoLDU"]),
        .testTarget(
            name: "LoLDUTests",
            dependencies: ["CLoLDU", "LoLDUCAPI", "CLinearAlgebra"]
        ),
    ]
)
