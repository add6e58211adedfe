// `sqlx::migrate!` embeds ./migrations at compile time; without this a new migration
// file does not trigger a rebuild (as the sqlx documentation recommends).
fn main() {
    println!("cargo:rerun-if-changed=migrations");
}
