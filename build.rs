fn main() {
    // Migrations are embedded with include_dir!; rebuild when one is added or edited.
    println!("cargo:rerun-if-changed=migrations");
}
