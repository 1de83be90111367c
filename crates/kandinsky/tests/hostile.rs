//! Hostile and broken model files, each refused with a clear error before anything large is
//! allocated or anything is executed: a pickle that calls a global, safetensors headers that lie
//! (gigabytes of header, sizes past the end of the file, overflowing shapes, overlapping tensors),
//! and a config of absurd size.

mod common;

use kandinsky::loading::{WeightStore, MAX_PARAMETERS};
use kandinsky::models::{UNet2DConditionModel, VQModel};
use std::path::Path;
use std::time::{Duration, Instant};

/// A safetensors file from a raw header (as given) and `data`.
fn safetensors(dir: &Path, header: &str, data: &[u8]) -> std::path::PathBuf {
    let path = dir.join("model.safetensors");
    let mut bytes = (header.len() as u64).to_le_bytes().to_vec();
    bytes.extend_from_slice(header.as_bytes());
    bytes.extend_from_slice(data);
    std::fs::write(&path, bytes).unwrap();
    path
}

/// Opens `path` and returns the error, which must come quickly.
fn refused(path: &Path) -> String {
    let start = Instant::now();
    let err = match WeightStore::open(&[path.to_path_buf()]) {
        Ok(_) => panic!("{} was accepted", path.display()),
        Err(e) => e.to_string(),
    };
    assert!(
        start.elapsed() < Duration::from_secs(2),
        "slow refusal: {err}"
    );
    err
}

#[test]
fn lying_safetensors_headers_are_refused() {
    let dir = tempfile::tempdir().unwrap();
    let data = [0u8; 64];
    for (header, words) in [
        // A tensor of 4 TiB declared in a 100-byte header.
        (
            r#"{"w":{"dtype":"F32","shape":[1048576,1048576],"data_offsets":[0,4398046511104]}}"#,
            "does not hold",
        ),
        // A shape whose element count overflows 64 bits, with an empty range.
        (
            r#"{"w":{"dtype":"F32","shape":[4294967296,4294967296,16],"data_offsets":[0,0]}}"#,
            "does not hold",
        ),
        // An end offset that overflows when added to the header's.
        (
            r#"{"w":{"dtype":"U8","shape":[1],"data_offsets":[18446744073709551614,18446744073709551615]}}"#,
            "does not hold",
        ),
        // Past the end of the file.
        (
            r#"{"w":{"dtype":"F32","shape":[32],"data_offsets":[0,128]}}"#,
            "does not hold",
        ),
        // Two tensors over the same bytes.
        (
            r#"{"a":{"dtype":"F32","shape":[4],"data_offsets":[0,16]},"b":{"dtype":"F32","shape":[4],"data_offsets":[8,24]}}"#,
            "overlap",
        ),
        // Reversed offsets.
        (
            r#"{"w":{"dtype":"F32","shape":[2],"data_offsets":[8,0]}}"#,
            "does not hold",
        ),
        (
            r#"{"w":{"dtype":"F32","shape":[-1],"data_offsets":[0,4]}}"#,
            "invalid header entry",
        ),
        (
            r#"{"w":{"dtype":"C64","shape":[1],"data_offsets":[0,8]}}"#,
            "unsupported dtype",
        ),
        (r#"not json"#, "invalid header"),
    ] {
        let path = safetensors(dir.path(), header, &data);
        let err = refused(&path);
        assert!(err.contains(words), "{header}: {err}");
    }
    // A header length of 5 GB in a file of a few bytes.
    let path = dir.path().join("huge-header.safetensors");
    let mut bytes = 5_000_000_000u64.to_le_bytes().to_vec();
    bytes.extend_from_slice(b"{}");
    std::fs::write(&path, bytes).unwrap();
    assert!(refused(&path).contains("invalid header length"));
    // Truncated: fewer than the 8 length bytes.
    std::fs::write(&path, [1u8, 2, 3]).unwrap();
    assert!(refused(&path).contains("too small"));
}

/// CRC-32 (IEEE), for the zip writer below.
fn crc32(data: &[u8]) -> u32 {
    let mut crc = 0xffff_ffffu32;
    for &b in data {
        crc ^= b as u32;
        for _ in 0..8 {
            crc = if crc & 1 != 0 {
                (crc >> 1) ^ 0xedb8_8320
            } else {
                crc >> 1
            };
        }
    }
    !crc
}

/// A zip archive of stored (uncompressed) files, as `torch.save` writes `.bin` files:
/// `archive/data.pkl` and friends.
fn zip_stored(files: &[(&str, &[u8])]) -> Vec<u8> {
    let (mut out, mut central) = (Vec::new(), Vec::new());
    for (name, data) in files {
        let offset = out.len() as u32;
        let (crc, len, name_len) = (crc32(data), data.len() as u32, name.len() as u16);
        out.extend_from_slice(&0x0403_4b50u32.to_le_bytes());
        out.extend_from_slice(&[20, 0, 0, 0, 0, 0, 0, 0, 0, 0]);
        for v in [crc, len, len] {
            out.extend_from_slice(&v.to_le_bytes());
        }
        out.extend_from_slice(&name_len.to_le_bytes());
        out.extend_from_slice(&0u16.to_le_bytes());
        out.extend_from_slice(name.as_bytes());
        out.extend_from_slice(data);
        central.extend_from_slice(&0x0201_4b50u32.to_le_bytes());
        central.extend_from_slice(&[20, 0, 20, 0, 0, 0, 0, 0, 0, 0, 0, 0]);
        for v in [crc, len, len] {
            central.extend_from_slice(&v.to_le_bytes());
        }
        central.extend_from_slice(&name_len.to_le_bytes());
        central.extend_from_slice(&[0; 12]);
        central.extend_from_slice(&offset.to_le_bytes());
        central.extend_from_slice(name.as_bytes());
    }
    let (start, size) = (out.len() as u32, central.len() as u32);
    out.extend_from_slice(&central);
    out.extend_from_slice(&0x0605_4b50u32.to_le_bytes());
    out.extend_from_slice(&[0, 0, 0, 0]);
    let n = files.len() as u16;
    out.extend_from_slice(&n.to_le_bytes());
    out.extend_from_slice(&n.to_le_bytes());
    out.extend_from_slice(&size.to_le_bytes());
    out.extend_from_slice(&start.to_le_bytes());
    out.extend_from_slice(&0u16.to_le_bytes());
    out
}

#[test]
fn a_pickle_that_calls_a_global_is_refused_without_running_it() {
    let dir = tempfile::tempdir().unwrap();
    let marker = dir.path().join("pwned");
    let command = format!("touch {}", marker.display());
    // Protocol 2: GLOBAL os.system, the command, TUPLE1, REDUCE, STOP — what `pickle.dumps` of an
    // object whose __reduce__ returns (os.system, (command,)) holds.
    let mut p = b"\x80\x02cos\nsystem\nq\x00X".to_vec();
    p.extend_from_slice(&(command.len() as u32).to_le_bytes());
    p.extend_from_slice(command.as_bytes());
    p.extend_from_slice(b"q\x01\x85q\x02Rq\x03.");
    let path = dir.path().join("diffusion_pytorch_model.bin");
    std::fs::write(&path, &p).unwrap();
    let err = refused(&path);
    assert!(!marker.exists(), "the pickle's command ran");
    assert!(err.contains(&path.display().to_string()), "{err}");
    // As torch.save writes it (a zip holding `archive/data.pkl`), alone and as the value of a
    // state dict's key: still no tensors, still nothing run.
    let mut in_dict = b"\x80\x02}q\x00X\x01\x00\x00\x00wq\x01cos\nsystem\nq\x02X".to_vec();
    in_dict.extend_from_slice(&(command.len() as u32).to_le_bytes());
    in_dict.extend_from_slice(command.as_bytes());
    in_dict.extend_from_slice(b"q\x03\x85q\x04Rq\x05s.");
    for pickle in [&p, &in_dict] {
        let zip = zip_stored(&[("archive/data.pkl", pickle), ("archive/version", b"3\n")]);
        std::fs::write(&path, zip).unwrap();
        let err = refused(&path);
        assert!(!marker.exists(), "the pickle's command ran");
        // The archive and its pickle were read (not refused as a bad zip) and held no tensor.
        assert!(err.contains("no tensors found in the pickle"), "{err}");
    }
}

#[test]
fn a_config_of_absurd_size_is_refused_from_the_config_alone() {
    let dir = tempfile::tempdir().unwrap();
    // The tiny fixture UNet with channels of a 10^12-parameter model, and no weights at all:
    // refused from config.json before the missing weights are even looked for.
    let src = common::fixtures().join("unet/dummy_2_2/config.json");
    let config: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(src).unwrap()).unwrap();
    // The UNet of `config`, which must be refused quickly: the error.
    let unet_refused = |config: &serde_json::Value| {
        std::fs::write(dir.path().join("config.json"), config.to_string()).unwrap();
        let start = Instant::now();
        let err = UNet2DConditionModel::load(
            dir.path(),
            candle_core::DType::F32,
            &candle_core::Device::Cpu,
        )
        .unwrap_err()
        .to_string();
        assert!(start.elapsed() < Duration::from_secs(5), "slow: {err}");
        err
    };
    let mut huge = config.clone();
    huge["block_out_channels"] = serde_json::json!([262144, 262144]);
    let err = unet_refused(&huge);
    assert!(
        err.contains("parameters") && err.contains(&MAX_PARAMETERS.to_string()),
        "{err}"
    );
    // Counts that build Rust structures one by one (a billion layers) are refused from the JSON.
    for (key, value, words) in [
        (
            "layers_per_block",
            serde_json::json!(1_000_000_000),
            "beyond any real model",
        ),
        (
            "block_out_channels",
            serde_json::json!(vec![32; 100_000]),
            "entries",
        ),
        (
            "sample_size",
            serde_json::json!(1e300),
            "beyond any real model",
        ),
    ] {
        let mut c = config.clone();
        c[key] = value;
        let err = unet_refused(&c);
        assert!(err.contains(words), "{key}: {err}");
    }
    // The same for a MoVQ.
    let src = common::fixtures().join("movq/dummy/config.json");
    let mut config: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(src).unwrap()).unwrap();
    config["block_out_channels"] = serde_json::json!([1048576, 1048576]);
    std::fs::write(dir.path().join("config.json"), config.to_string()).unwrap();
    let err = VQModel::load(
        dir.path(),
        candle_core::DType::F32,
        &candle_core::Device::Cpu,
    )
    .unwrap_err()
    .to_string();
    assert!(err.contains("parameters"), "{err}");
}

/// A PNG whose header declares `width × height` (and holds no pixels).
fn png_header_only(width: u32, height: u32) -> Vec<u8> {
    let mut png = b"\x89PNG\r\n\x1a\n".to_vec();
    let mut chunk = |kind: &[u8], data: &[u8]| {
        png.extend_from_slice(&(data.len() as u32).to_be_bytes());
        let mut body = kind.to_vec();
        body.extend_from_slice(data);
        png.extend_from_slice(&body);
        png.extend_from_slice(&crc32(&body).to_be_bytes());
    };
    let mut ihdr = width.to_be_bytes().to_vec();
    ihdr.extend_from_slice(&height.to_be_bytes());
    ihdr.extend_from_slice(&[8, 2, 0, 0, 0]);
    chunk(b"IHDR", &ihdr);
    // An empty zlib stream: the decoder needs an IDAT to report the header's size.
    chunk(b"IDAT", b"\x78\x9c\x03\x00\x00\x00\x00\x01");
    chunk(b"IEND", &[]);
    png
}

#[test]
fn decompression_bombs_are_refused_from_the_header() {
    use kandinsky::vae_image_processor::{decode_image, read_rgb8, DecodeError};
    let dir = tempfile::tempdir().unwrap();
    // 100 000 × 100 000 RGB would be 30 GB of pixels.
    let path = dir.path().join("bomb.png");
    std::fs::write(&path, png_header_only(100_000, 100_000)).unwrap();
    let start = Instant::now();
    let err = read_rgb8(&path).unwrap_err().to_string();
    assert!(
        err.contains("at most") && err.contains("100000x100000"),
        "{err}"
    );
    assert!(start.elapsed() < Duration::from_secs(1));
    assert!(matches!(
        decode_image(&png_header_only(5000, 5000)),
        Err(DecodeError::TooLarge {
            width: 5000,
            height: 5000
        })
    ));
    // Within the limit but without pixels: a clear error, not a panic.
    assert!(matches!(
        decode_image(&png_header_only(64, 64)),
        Err(DecodeError::NotAnImage(_))
    ));
    assert!(matches!(
        decode_image(b"GIF89a"),
        Err(DecodeError::NotAnImage(_))
    ));
}

/// A safetensors file of one tensor `w` of `dtype` and raw little-endian `data`.
fn one_tensor(dir: &Path, dtype: &str, count: usize, data: &[u8]) -> std::path::PathBuf {
    let header = format!(
        r#"{{"w":{{"dtype":"{dtype}","shape":[{count}],"data_offsets":[0,{}]}}}}"#,
        data.len()
    );
    safetensors(dir, &header, data)
}

fn f32_le_bytes(values: &[f32]) -> Vec<u8> {
    values.iter().flat_map(|v| v.to_le_bytes()).collect()
}

#[test]
fn non_finite_weights_are_refused_when_read() {
    use candle_core::{DType, Device};
    let dir = tempfile::tempdir().unwrap();
    let load = |path: &Path, n: usize| {
        WeightStore::open(&[path.to_path_buf()])
            .unwrap()
            .load("w", &[n], DType::F32, &Device::Cpu)
    };
    // Past the first scanning block, so the reported index is not the block's.
    let n = 10_000;
    let mut values = vec![0.5f32; n];
    let f32s = |values: &[f32]| one_tensor(dir.path(), "F32", n, &f32_le_bytes(values));
    let path = f32s(&values);
    assert_eq!(
        load(&path, n)
            .unwrap()
            .sum_all()
            .unwrap()
            .to_scalar::<f32>()
            .unwrap(),
        5000.0
    );
    for (i, bad) in [
        (9_000, f32::NAN),
        (4_097, f32::INFINITY),
        (0, f32::NEG_INFINITY),
    ] {
        values.fill(0.5);
        values[i] = bad;
        let path = f32s(&values);
        let err = load(&path, n).unwrap_err().to_string();
        assert!(
            err.contains("tensor 'w'")
                && err.contains(&format!(
                    "non-finite value (NaN or infinity) at element {i}"
                )),
            "{bad} at {i}: {err}"
        );
    }
    // Half precision: f16 infinity (0x7c00), bf16 NaN (0x7fc0); the largest finite f16 passes.
    for (dtype, bits, ok) in [
        ("F16", 0x7c00u16, false),
        ("BF16", 0x7fc0, false),
        ("F16", 0x7bff, true),
    ] {
        let data: Vec<u8> = [0x3c00u16, bits, 0]
            .iter()
            .flat_map(|v| v.to_le_bytes())
            .collect();
        let path = one_tensor(dir.path(), dtype, 3, &data);
        let got = load(&path, 3);
        assert_eq!(got.is_ok(), ok, "{dtype} {bits:#x}: {got:?}");
        if !ok {
            assert!(got.unwrap_err().to_string().contains("at element 1"));
        }
    }
    // Integer tensors are not floats: every bit pattern is a value.
    let path = one_tensor(dir.path(), "U8", 4, &[0xff; 4]);
    assert!(WeightStore::open(&[path])
        .unwrap()
        .load("w", &[4], DType::U8, &Device::Cpu)
        .is_ok());
}

#[test]
fn symlinks_leading_outside_a_model_directory_are_found() {
    use kandinsky::loading::check_confined;
    use std::os::unix::fs::symlink;
    let tmp = tempfile::tempdir().unwrap();
    let root = tmp.path();
    std::fs::create_dir_all(root.join("outside")).unwrap();
    std::fs::write(root.join("outside/secret"), b"secret").unwrap();
    let model = root.join("model");
    std::fs::create_dir_all(model.join("unet")).unwrap();
    std::fs::create_dir_all(model.join("vq")).unwrap();
    std::fs::write(model.join("unet/config.json"), b"{}").unwrap();
    // Links that stay inside (a shared component, a file) are fine.
    symlink(model.join("vq"), model.join("movq")).unwrap();
    symlink("../unet/config.json", model.join("vq/config.json")).unwrap();
    // A dangling link reads nothing: left to the loader.
    symlink(root.join("nowhere"), model.join("vq/gone")).unwrap();
    check_confined(&model).unwrap();
    // The model directory itself may be reached through a link.
    symlink(&model, root.join("alias")).unwrap();
    check_confined(&root.join("alias")).unwrap();

    let outside = |link: &Path, target: &Path| {
        symlink(target, link).unwrap();
        let err = check_confined(&model).unwrap_err();
        assert!(
            matches!(&err, kandinsky::Error::SymlinkOutside { link: l, .. }
                if l.file_name() == link.file_name()),
            "{err}"
        );
        assert!(
            err.to_string().contains("outside the model directory"),
            "{err}"
        );
        std::fs::remove_file(link).unwrap();
    };
    let weights = model.join("unet/diffusion_pytorch_model.safetensors");
    outside(&weights, &root.join("outside/secret"));
    outside(&weights, Path::new("/etc/passwd"));
    outside(&weights, Path::new("../../outside/secret"));
    // A directory link that leaves, and a link inside a linked directory that leaves.
    outside(&model.join("text_encoder"), &root.join("outside"));
    outside(&model.join("vq/model.safetensors"), Path::new("/dev/zero"));
    check_confined(&model).unwrap();

    // A Hugging Face cache snapshot links into its repository's blobs: allowed; past them: not.
    let repo = root.join("hub/models--org--name");
    let snapshot = repo.join("snapshots/0123abcd");
    std::fs::create_dir_all(repo.join("blobs")).unwrap();
    std::fs::create_dir_all(snapshot.join("unet")).unwrap();
    std::fs::write(repo.join("blobs/aa11"), b"{}").unwrap();
    symlink("../../../blobs/aa11", snapshot.join("unet/config.json")).unwrap();
    check_confined(&snapshot).unwrap();
    check_confined(&snapshot.join("unet")).unwrap();
    symlink(
        root.join("outside/secret"),
        snapshot.join("unet/x.safetensors"),
    )
    .unwrap();
    assert!(matches!(
        check_confined(&snapshot),
        Err(kandinsky::Error::SymlinkOutside { .. })
    ));
}
