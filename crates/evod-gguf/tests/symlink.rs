//! Model paths are opened without following a symbolic link in the final
//! component (`O_NOFOLLOW`): a link swapped in at a model's path is refused
//! with a typed error naming the path; `open_following` reads through it.

use std::os::unix::fs::symlink;
use std::path::Path;

use evod_gguf::{GgufError, GgufFile, PublishOptions, TensorSpec, TensorType, Value, publish};

fn write_model(path: &Path, name: &str) {
    let metadata = vec![("general.name".to_owned(), Value::String(name.into()))];
    let tensors = vec![TensorSpec {
        name: "t".into(),
        dims: vec![4],
        ttype: TensorType::F32,
    }];
    publish(
        path,
        &metadata,
        &tensors,
        |_, w| w.write_all(&[0u8; 16]),
        &PublishOptions::default(),
    )
    .unwrap();
}

fn name_of(f: &GgufFile) -> String {
    f.get("general.name").unwrap().as_str().unwrap().to_owned()
}

#[test]
fn a_symlinked_model_path_is_refused_with_a_typed_error() {
    let dir = tempfile::tempdir().unwrap();
    let real = dir.path().join("real.gguf");
    write_model(&real, "real");
    let link = dir.path().join("model.gguf");
    symlink(&real, &link).unwrap();

    let e = GgufFile::open(&link).unwrap_err();
    match &e {
        GgufError::Symlink { path } => assert_eq!(path, &link),
        other => panic!("expected Symlink, got {other:?}"),
    }
    assert_eq!(
        e.to_string(),
        format!(
            "{} is a symbolic link; evod does not follow links for model files",
            link.display()
        )
    );
    // The real file opens; open_following reads through the link.
    assert_eq!(name_of(&GgufFile::open(&real).unwrap()), "real");
    let f = GgufFile::open_following(&link).unwrap();
    assert_eq!(name_of(&f), "real");
    assert_eq!(f.path(), link.as_path());
}

#[test]
fn a_link_swapped_in_after_a_publish_is_not_followed() {
    let dir = tempfile::tempdir().unwrap();
    let model = dir.path().join("model.gguf");
    write_model(&model, "gen0");
    assert_eq!(name_of(&GgufFile::open(&model).unwrap()), "gen0");
    // An attacker replaces the published file by a link to another file.
    let elsewhere = dir.path().join("elsewhere.gguf");
    write_model(&elsewhere, "attacker");
    std::fs::remove_file(&model).unwrap();
    symlink(&elsewhere, &model).unwrap();
    assert!(matches!(
        GgufFile::open(&model),
        Err(GgufError::Symlink { .. })
    ));
    // A dangling link is refused the same way, not reported as missing.
    let dangling = dir.path().join("dangling.gguf");
    symlink(dir.path().join("absent.gguf"), &dangling).unwrap();
    assert!(matches!(
        GgufFile::open(&dangling),
        Err(GgufError::Symlink { .. })
    ));
    assert!(matches!(
        GgufFile::open_following(&dangling),
        Err(GgufError::Open { .. })
    ));
    // Publishing over the link replaces the link itself (rename), after
    // which the path opens again and the link's target is untouched.
    write_model(&model, "gen1");
    assert_eq!(name_of(&GgufFile::open(&model).unwrap()), "gen1");
    assert_eq!(name_of(&GgufFile::open(&elsewhere).unwrap()), "attacker");
}

#[test]
fn links_among_the_folders_are_followed() {
    // Only the final component is checked: a run folder reached through a
    // linked folder (e.g. /var/run -> /run) still works.
    let dir = tempfile::tempdir().unwrap();
    let real_dir = dir.path().join("real");
    std::fs::create_dir(&real_dir).unwrap();
    write_model(&real_dir.join("m.gguf"), "in folder");
    let linked_dir = dir.path().join("linked");
    symlink(&real_dir, &linked_dir).unwrap();
    let f = GgufFile::open(&linked_dir.join("m.gguf")).unwrap();
    assert_eq!(name_of(&f), "in folder");
}
