mod broker;
fn main() {}
