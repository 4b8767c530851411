import CLoLDU
import Glibc
import LoLDU

// The checkpoint functions of include/loldu.h: validate, call the core, map errors.

/// A checkpoint with its layer names as C strings that live as long as the handle.
final class CheckpointHandle: @unchecked Sendable {
    let checkpoint: Checkpoint
    let names: [UnsafeMutablePointer<CChar>]

    init(_ checkpoint: Checkpoint) throws(LoLDUError) {
        self.checkpoint = checkpoint
        var names: [UnsafeMutablePointer<CChar>] = []
        for layer in checkpoint.layers {
            guard let copy = strdup(layer.name) else {
                names.forEach { free($0) }
                throw LoLDUError(.outOfMemory, "out of memory copying the layer names")
            }
            names.append(copy)
        }
        self.names = names
    }

    deinit { names.forEach { free($0) } }
}

let checkpoints = HandleTable<CheckpointHandle>(kind: "loldu_checkpoint")

extension Check {
    /// `count` names from a C array of C strings.
    static func names(_ list: UnsafePointer<UnsafePointer<CChar>?>?, _ count: Int) throws(LoLDUError) -> [String] {
        let list = try nonNull(list, "names")
        try ensureRoom(count, bytesEach: 128)
        var result: [String] = []
        for i in 0..<count {
            let text = try nonNull(list[i], "names[\(i)]")
            guard strnlen(text, 513) <= 512 else { throw .invalid("names[\(i)] must be 1 to 512 bytes long, got more") }
            guard let name = String(validatingCString: text) else {
                throw .invalid("names[\(i)] is not valid UTF-8")
            }
            result.append(name)
        }
        return result
    }

    static func layerName(_ name: UnsafePointer<CChar>?) throws(LoLDUError) -> String {
        guard let text = String(validatingCString: try nonNull(name, "name")) else {
            throw .invalid("name is not valid UTF-8")
        }
        return text
    }
}

@_cdecl("loldu_checkpoint_save")
public func lolduCheckpointSave(
    _ dir: UnsafePointer<CChar>?, _ list: UnsafePointer<OpaquePointer?>?,
    _ names: UnsafePointer<UnsafePointer<CChar>?>?, _ count: Int
) -> Int32 {
    status { () throws(LoLDUError) in
        let path = try Check.path(dir, "dir")
        let chosen = try Check.adapterList(list, count)
        try Checkpoint.save(chosen, names: try Check.names(names, count), to: path)
    }
}

@_cdecl("loldu_export_merged")
public func lolduExportMerged(
    _ path: UnsafePointer<CChar>?, _ list: UnsafePointer<OpaquePointer?>?,
    _ names: UnsafePointer<UnsafePointer<CChar>?>?, _ count: Int
) -> Int32 {
    status { () throws(LoLDUError) in
        let file = try Check.path(path, "path")
        let chosen = try Check.adapterList(list, count)
        try Checkpoint.exportMerged(chosen, names: try Check.names(names, count), to: file)
    }
}

@_cdecl("loldu_checkpoint_open")
public func lolduCheckpointOpen(_ out: UnsafeMutablePointer<OpaquePointer?>?, _ dir: UnsafePointer<CChar>?) -> Int32 {
    status { () throws(LoLDUError) in
        let out = try Check.nonNull(out, "out")
        let checkpoint = try Checkpoint(directory: try Check.path(dir, "dir"))
        out.pointee = checkpoints.insert(try CheckpointHandle(checkpoint))
    }
}

@_cdecl("loldu_checkpoint_free")
public func lolduCheckpointFree(_ handle: OpaquePointer?) {
    checkpoints.remove(handle)
}

@_cdecl("loldu_checkpoint_count")
public func lolduCheckpointCount(_ handle: OpaquePointer?, _ count: UnsafeMutablePointer<Int>?) -> Int32 {
    status { () throws(LoLDUError) in
        let c = try checkpoints.get(handle, "checkpoint")
        try Check.nonNull(count, "count").pointee = c.names.count
    }
}

@_cdecl("loldu_checkpoint_name")
public func lolduCheckpointName(_ handle: OpaquePointer?, _ index: Int, _ name: UnsafeMutablePointer<UnsafePointer<CChar>?>?) -> Int32 {
    status { () throws(LoLDUError) in
        let c = try checkpoints.get(handle, "checkpoint")
        let out = try Check.nonNull(name, "name")
        guard index >= 0, index < c.names.count else {
            throw .invalid("index must be in [0, \(c.names.count)), got \(UInt(bitPattern: index))")
        }
        out.pointee = UnsafePointer(c.names[index])
    }
}

@_cdecl("loldu_checkpoint_layer")
public func lolduCheckpointLayer(
    _ handle: OpaquePointer?, _ name: UnsafePointer<CChar>?, _ dtype: UnsafeMutablePointer<Int32>?,
    _ m: UnsafeMutablePointer<Int64>?, _ n: UnsafeMutablePointer<Int64>?, _ config: UnsafeMutablePointer<loldu_config>?
) -> Int32 {
    status { () throws(LoLDUError) in
        let c = try checkpoints.get(handle, "checkpoint")
        let layer = try c.checkpoint.layer(try Check.layerName(name))
        dtype?.pointee = layer.dtype.rawValue
        m?.pointee = Int64(layer.m)
        n?.pointee = Int64(layer.n)
        config?.pointee = loldu_config(layer.config)
    }
}

@_cdecl("loldu_checkpoint_apply")
public func lolduCheckpointApply(_ handle: OpaquePointer?, _ name: UnsafePointer<CChar>?, _ adapter: OpaquePointer?) -> Int32 {
    status { () throws(LoLDUError) in
        let c = try checkpoints.get(handle, "checkpoint")
        let target = try adapters.get(adapter, "adapter")
        try c.checkpoint.apply(try Check.layerName(name), to: target)
    }
}

@_cdecl("loldu_checkpoint_values")
public func lolduCheckpointValues(
    _ handle: OpaquePointer?, _ name: UnsafePointer<CChar>?, _ z: UnsafeMutablePointer<Double>?,
    _ sigma: UnsafeMutablePointer<Double>?, _ weightPrint: UnsafeMutablePointer<CChar>?, _ pivotsPrint: UnsafeMutablePointer<CChar>?
) -> Int32 {
    status { () throws(LoLDUError) in
        let c = try checkpoints.get(handle, "checkpoint")
        let layer = try c.checkpoint.layer(try Check.layerName(name))
        if let z { z.update(from: layer.z.pointer, count: layer.z.count) }
        sigma?.pointee = layer.sigma
        for (print, out) in [(layer.weightFingerprint, weightPrint), (layer.pivotsFingerprint, pivotsPrint)] {
            guard let out else { continue }
            let bytes = Array(print.utf8.prefix(16))
            for (i, byte) in bytes.enumerated() { out[i] = CChar(bitPattern: byte) }
            out[bytes.count] = 0
        }
    }
}

@_cdecl("loldu_checkpoint_create")
public func lolduCheckpointCreate(
    _ out: UnsafeMutablePointer<OpaquePointer?>?, _ handle: OpaquePointer?, _ name: UnsafePointer<CChar>?,
    _ baseDir: UnsafePointer<CChar>?
) -> Int32 {
    status { () throws(LoLDUError) in
        let out = try Check.nonNull(out, "out")
        let c = try checkpoints.get(handle, "checkpoint")
        let layer = try Check.layerName(name)
        let model = try ModelFiles(directory: try Check.path(baseDir, "base_dir"))
        out.pointee = adapters.insert(try c.checkpoint.adapter(layer, in: model))
    }
}
