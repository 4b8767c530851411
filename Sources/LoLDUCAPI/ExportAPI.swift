import CLoLDU
import LoLDU

// Leaving the library (include/loldu.h): LoRA exports and merged model files.

@_cdecl("loldu_lora_options_default")
public func lolduLoraOptionsDefault(_ options: UnsafeMutablePointer<loldu_lora_options>?) -> Int32 {
    status { () throws(LoLDUError) in
        var o = loldu_lora_options()
        o.struct_size = UInt32(MemoryLayout<loldu_lora_options>.size)
        o.dtype = LoRAExport.Options().dtype.rawValue
        try Check.nonNull(options, "options").pointee = o
    }
}

@_cdecl("loldu_export_lora")
public func lolduExportLora(
    _ dir: UnsafePointer<CChar>?, _ list: UnsafePointer<OpaquePointer?>?,
    _ names: UnsafePointer<UnsafePointer<CChar>?>?, _ count: Int, _ options: UnsafePointer<loldu_lora_options>?
) -> Int32 {
    status { () throws(LoLDUError) in
        let path = try Check.path(dir, "dir")
        let chosen = try Check.adapterList(list, count)
        let layerNames = try Check.names(names, count)
        var settings = LoRAExport.Options()
        var layers = [LoRAExport.Layer](repeating: .init(), count: count)
        if let options {
            try Check.structSize(options, "options")
            let o = options.pointee
            settings.dtype = try Check.dtype(o.dtype)
            settings.replace = try Check.flag(o.replace, "options.replace")
            if let base = o.base_model_name_or_path {
                guard let text = String(validatingCString: base) else {
                    throw .invalid("options.base_model_name_or_path is not valid UTF-8")
                }
                settings.baseModel = text
            }
            if let given = o.layers {
                for i in 0..<count {
                    let layer = given[i]
                    guard let kind = LoRAExport.Kind(rawValue: layer.kind) else {
                        throw .invalid("options.layers[\(i)].kind must be a loldu_lora_kind in [0, 2], got \(layer.kind)")
                    }
                    layers[i].kind = kind
                    if kind == .convolution {
                        guard (1...3).contains(layer.kernel_dims) else {
                            throw .invalid("options.layers[\(i)].kernel_dims must be 1, 2 or 3 for LOLDU_LORA_CONV, got \(layer.kernel_dims)")
                        }
                        let sizes = [layer.kernel.0, layer.kernel.1, layer.kernel.2].prefix(Int(layer.kernel_dims))
                        guard sizes.allSatisfy({ $0 >= 1 && $0 <= Int64(Int32.max) }) else {
                            throw .invalid("options.layers[\(i)].kernel must hold sizes ≥ 1, got \(Array(sizes))")
                        }
                        layers[i].kernel = sizes.map { Int($0) }
                    }
                }
            }
        }
        try LoRAExport.write(chosen, names: layerNames, layers: layers, options: settings, to: path)
    }
}

@_cdecl("loldu_merge_options_default")
public func lolduMergeOptionsDefault(_ options: UnsafeMutablePointer<loldu_merge_options>?) -> Int32 {
    status { () throws(LoLDUError) in
        var o = loldu_merge_options()
        o.struct_size = UInt32(MemoryLayout<loldu_merge_options>.size)
        try Check.nonNull(options, "options").pointee = o
    }
}

@_cdecl("loldu_merge_model")
public func lolduMergeModel(
    _ outDir: UnsafePointer<CChar>?, _ baseDir: UnsafePointer<CChar>?, _ handle: OpaquePointer?,
    _ options: UnsafePointer<loldu_merge_options>?
) -> Int32 {
    status { () throws(LoLDUError) in
        let output = try Check.path(outDir, "out_dir")
        let base = try Check.path(baseDir, "base_dir")
        let c = try checkpoints.get(handle, "checkpoint")
        var dtype: DType?
        var progress: ModelMerge.Progress?
        if let options {
            try Check.structSize(options, "options")
            let o = options.pointee
            if o.dtype != 0 {
                dtype = try Check.dtype(o.dtype)
                guard dtype != .float64 else {
                    throw .invalid("options.dtype must be 0 (keep), LOLDU_FLOAT32, LOLDU_BFLOAT16 or LOLDU_FLOAT16, got LOLDU_FLOAT64")
                }
            }
            if let report = o.progress {
                let user = o.user
                progress = { done, total, tensor in
                    tensor.withCString { report(user, UInt64(done), UInt64(total), $0) } == 0
                }
            }
        }
        try ModelMerge.merge(c.checkpoint, base: base, into: output, dtype: dtype, progress: progress)
    }
}
