import CLoLDU
import Glibc
import LoLDU

// Version, status strings, errors and threads: include/loldu.h, first sections.

/// The version, from the header's macros (the single source of the version number).
let versionNumber = UInt32(LOLDU_VERSION_MAJOR * 10000 + LOLDU_VERSION_MINOR * 100 + LOLDU_VERSION_PATCH)
nonisolated(unsafe) let versionCString: UnsafePointer<CChar> =
    strdup(libraryVersion).map { UnsafePointer($0) } ?? cString("unknown (out of memory)")

@_cdecl("loldu_version_number")
public func lolduVersionNumber() -> UInt32 { versionNumber }

@_cdecl("loldu_version_string")
public func lolduVersionString() -> UnsafePointer<CChar> { versionCString }

@_cdecl("loldu_status_string")
public func lolduStatusString(_ code: Int32) -> UnsafePointer<CChar> {
    switch code {
    case 0: cString("ok")
    case 1: cString("invalid argument")
    case 2: cString("null pointer")
    case 3: cString("shape mismatch or size out of range")
    case 4: cString("non-finite value")
    case 5: cString("element type mismatch")
    case 6: cString("not allowed in the current state")
    case 7: cString("out of memory")
    case 8: cString("invalid handle")
    case 9: cString("input/output error")
    case 10: cString("malformed file")
    case 11: cString("checkpoint does not match the base weights")
    case 12: cString("internal error")
    case 13: cString("cancelled")
    default: cString("unknown status")
    }
}

@_cdecl("loldu_last_error")
public func lolduLastError() -> UnsafePointer<CChar> {
    lastErrorMessage()
}

@_cdecl("loldu_set_num_threads")
public func lolduSetNumThreads(_ threads: Int32) -> Int32 {
    status { () throws(LoLDUError) in
        guard threads >= 1 else { throw .invalid("threads must be >= 1, got \(threads)") }
        try BLASThreads.set(Int(threads))
    }
}

@_cdecl("loldu_get_num_threads")
public func lolduGetNumThreads() -> Int32 {
    Int32(BLASThreads.count)
}

@_cdecl("loldu_config_default")
public func lolduConfigDefault(_ config: UnsafeMutablePointer<loldu_config>?) -> Int32 {
    status { () throws(LoLDUError) in
        try Check.nonNull(config, "config").pointee = loldu_config(AdapterConfig())
    }
}

@_cdecl("loldu_gemm_backend")
public func lolduGemmBackend(
    _ dtype: Int32, _ backend: UnsafeMutablePointer<Int32>?, _ description: UnsafeMutablePointer<UnsafePointer<CChar>?>?
) -> Int32 {
    status { () throws(LoLDUError) in
        let type = try Check.dtype(dtype)
        try BLASWorkBuffers.ensure()  // (bf16's choice may time a product)
        let chosen = GEMMBackend.backend(for: type)
        backend?.pointee = Check.backendCode(chosen)
        if let description { description.pointee = gemmDescription }
    }
}

/// The libraries behind the GEMMs (static storage, built once).
nonisolated(unsafe) let gemmDescription: UnsafePointer<CChar> =
    strdup(BLASThreads.description).map { UnsafePointer($0) } ?? cString("unknown (out of memory)")

@_cdecl("loldu_set_widened_half")
public func lolduSetWidenedHalf(_ widened: Int32) -> Int32 {
    status { () throws(LoLDUError) in
        GEMMBackend.forceWidened.store(try Check.flag(widened, "widened"))
    }
}
