//! `Model::open` scans every value; `Model::open_for_serving` (what a
//! respawned worker uses) checks the structure only, so it stays O(1) in
//! the model's size.

use std::io::{Seek, SeekFrom, Write};

use evod_gguf::GgufFile;
use evod_runtime::{Architecture, Model, ModelSpec, RuntimeError, init_params, write_model};

#[test]
fn a_non_finite_value_fails_open_but_not_open_for_serving() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("m.gguf");
    let arch = Architecture::new(vec![4, 16, 2], "tanh".parse().unwrap()).unwrap();
    write_model(
        &path,
        &ModelSpec::new(arch.clone(), "cartpole".into(), 1),
        &init_params(&arch, 1),
        None,
    )
    .unwrap();
    // Put a NaN into blk.1.weight, element 3.
    let at = {
        let f = GgufFile::open(&path).unwrap();
        let t = f.tensor("blk.1.weight").unwrap();
        f.data_offset() + t.offset + 12
    };
    let mut file = std::fs::OpenOptions::new().write(true).open(&path).unwrap();
    file.seek(SeekFrom::Start(at)).unwrap();
    file.write_all(&f32::NAN.to_le_bytes()).unwrap();
    drop(file);

    let err = Model::open(&path).unwrap_err();
    assert!(matches!(err, RuntimeError::Model { .. }), "{err}");
    let text = err.to_string();
    assert!(
        text.contains("blk.1.weight element 3") && text.contains("not finite"),
        "{text}"
    );

    let served = Model::open_for_serving(&path).unwrap();
    assert!(served.params().unwrap()[16 * 4 + 16 + 3].is_nan());
}

#[test]
fn open_for_serving_still_checks_the_structure() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("m.gguf");
    let arch = Architecture::new(vec![4, 16, 2], "tanh".parse().unwrap()).unwrap();
    let mut spec = ModelSpec::new(arch.clone(), "cartpole".into(), 1);
    write_model(&path, &spec, &init_params(&arch, 1), None).unwrap();
    // Claim other layers than the tensors have.
    let other = Architecture::new(vec![4, 8, 2], "tanh".parse().unwrap()).unwrap();
    spec.arch = other;
    let bad = dir.path().join("bad.gguf");
    let f = GgufFile::open(&path).unwrap();
    let mut meta = spec.metadata();
    meta.retain(|(k, _)| k.starts_with("evod.") || k.starts_with("general."));
    let tensors: Vec<evod_gguf::TensorSpec> = f
        .tensors()
        .iter()
        .map(evod_gguf::TensorSpec::from)
        .collect();
    evod_gguf::publish(
        &bad,
        &meta,
        &tensors,
        |i, w| w.write_all(f.tensor_bytes(&f.tensors()[i])),
        &evod_gguf::PublishOptions::default(),
    )
    .unwrap();
    let err = Model::open_for_serving(&bad).unwrap_err();
    assert!(err.to_string().contains("dims"), "{err}");
}

/// `read_params` (pread, no mapping: what the supervisor and the model
/// store use) gives the very parameters the mapped model gives, and a file
/// truncated in place is an error, not SIGBUS.
#[test]
fn read_params_matches_the_mapped_model_and_a_truncated_file_is_an_error() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("m.gguf");
    let arch = Architecture::new(vec![4, 16, 2], "tanh".parse().unwrap()).unwrap();
    let mut spec = ModelSpec::new(arch.clone(), "cartpole".into(), 1);
    spec.generation = 7;
    let params = init_params(&arch, 3);
    write_model(&path, &spec, &params, None).unwrap();
    let (read_spec, read) = evod_runtime::read_params(&path).unwrap();
    assert_eq!(read_spec.generation, 7);
    let mapped = Model::open(&path).unwrap();
    let bits = |v: &[f32]| v.iter().map(|x| x.to_bits()).collect::<Vec<_>>();
    assert_eq!(bits(&read), bits(&mapped.params().unwrap()));
    assert_eq!(bits(&read), bits(&params));
    drop(mapped);

    let len = std::fs::metadata(&path).unwrap().len();
    std::fs::OpenOptions::new()
        .write(true)
        .open(&path)
        .unwrap()
        .set_len(len - 40)
        .unwrap();
    let err = evod_runtime::read_params(&path).unwrap_err();
    assert!(matches!(err, RuntimeError::Gguf(_)), "{err}");
}

/// The value check and the checksum of a big model tick as they go (the
/// worker beats its heartbeat from the ticks during a `LOAD`), and give the
/// same answers as the one-shot forms.
#[test]
fn checking_and_hashing_a_big_model_ticks_along_the_way() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("big.gguf");
    // 4-4096-4096-2: about 16.8M parameters, 67 MB.
    let arch = Architecture::new(vec![4, 4096, 4096, 2], "tanh".parse().unwrap()).unwrap();
    let params = vec![0.25f32; arch.n_params()];
    write_model(
        &path,
        &ModelSpec::new(arch.clone(), "cartpole".into(), 1),
        &params,
        None,
    )
    .unwrap();
    let model = Model::open_for_serving(&path).unwrap();
    let mut ticks = 0;
    model.check_values_with(|| ticks += 1).unwrap();
    assert!(
        ticks >= 4,
        "{ticks} ticks checking {} values",
        arch.n_params()
    );
    let mut ticks = 0;
    let streamed = model.file.checksum_with(|| ticks += 1);
    assert!(ticks >= 4, "{ticks} ticks hashing");
    let one_shot = xxhash_rust::xxh3::xxh3_64(
        &std::fs::read(&path).unwrap()[model.file.data_offset() as usize..],
    );
    assert_eq!(streamed, one_shot);
}

/// A tied control vector records `evod.controlvector.tied = true` and
/// opens tied; a per-layer one has no such key; the key with another type
/// is refused by name.
#[test]
fn a_tied_control_vector_round_trips_and_a_mistyped_tie_is_refused() {
    let dir = tempfile::tempdir().unwrap();
    let per_layer = Architecture::control_vector(8, 3, "llama").unwrap();
    for tied in [false, true] {
        let arch = per_layer.clone().with_tied_directions(tied);
        let path = dir.path().join(format!("cvec-{tied}.gguf"));
        let spec = ModelSpec::new(arch.clone(), "perplexity".into(), 1);
        write_model(&path, &spec, &vec![0.0; arch.n_params()], None).unwrap();
        let model = Model::open(&path).unwrap();
        assert_eq!(model.spec.arch.tied_directions(), tied);
        assert_eq!(model.spec.arch, arch);
        let key = model
            .file
            .get(evod_runtime::model::keys::CVEC_TIED)
            .cloned();
        assert_eq!(key, tied.then_some(evod_gguf::Value::Bool(true)));
        assert!(
            model
                .spec
                .arch
                .to_string()
                .ends_with(if tied { ", tied" } else { "of 8" })
        );
    }
    // The key as a string.
    let src = GgufFile::open(&dir.path().join("cvec-true.gguf")).unwrap();
    let mut meta: Vec<(String, evod_gguf::Value)> = src
        .metadata()
        .iter()
        .map(|(k, v)| (k.clone(), v.clone()))
        .collect();
    for (k, v) in &mut meta {
        if k == evod_runtime::model::keys::CVEC_TIED {
            *v = evod_gguf::Value::String("yes".into());
        }
    }
    let tensors: Vec<evod_gguf::TensorSpec> = src
        .tensors()
        .iter()
        .map(evod_gguf::TensorSpec::from)
        .collect();
    let bad = dir.path().join("bad.gguf");
    evod_gguf::publish(
        &bad,
        &meta,
        &tensors,
        |i, w| w.write_all(src.tensor_bytes(&src.tensors()[i])),
        &evod_gguf::PublishOptions::default(),
    )
    .unwrap();
    let err = Model::open(&bad).unwrap_err().to_string();
    assert!(
        err.contains("evod.controlvector.tied") && err.contains("not a bool"),
        "{err}"
    );
}
